//! Migration of a table written by Feast's contrib Iceberg online store into our layout.
//!
//! The contrib table (append-only, a row per key per materialization) keeps the serialized
//! entity key as a hex string, an `entity_hash` identity partition, naive timestamps and
//! features in Feast's Arrow types (Float32/Int32 sometimes widened). Its columns cannot be
//! retyped in place, so we build our table beside it (`<name>__migrating`), upserting the
//! contrib files one at a time (newest row per key wins, memory bounded by one file), then
//! point the original identifier at the new metadata with the catalog's compare-and-swap:
//! readers see the contrib table or ours, never a mix, and a contrib writer that commits in
//! between makes the swap fail with nothing replaced.

use std::sync::Arc;
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch, new_null_array};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::catalog::TableId;
use crate::convert::{deserialize_entity_key, join_key_columns};
use crate::error::{Error, Result};
use crate::schema::{
    CREATED_TS, ColumnKind, ColumnSpec, ENTITY_KEY, EVENT_TS, Layout, PROP_VALUE_TYPES,
};
use crate::store::Store;
use crate::table::{SnapshotFiles, TableState, read_metadata};
use crate::write::{compact, upsert_batch};

/// What a migration did (or, on a dry run, found).
#[derive(Debug, Default, Clone)]
pub struct MigrationReport {
    /// The table already has our layout: nothing to do.
    pub already_migrated: bool,
    pub files_read: usize,
    pub rows_read: u64,
    /// Live rows after migration: one per entity key.
    pub rows_live: u64,
    /// The contrib table's last metadata file (its files are left in place).
    pub previous_metadata: String,
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Serialized entity keys from the contrib `entity_key` column (hex text, or bytes).
fn entity_keys(column: &ArrayRef) -> Result<Vec<Vec<u8>>> {
    let bad = |i: usize| Error::input(format!("entity_key of row {i} is not a hex serialized key"));
    match column.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let text = arrow_cast::cast(column, &DataType::Utf8)?;
            let text = text.as_string::<i32>();
            (0..text.len())
                .map(|i| hex_decode(text.value(i)).ok_or_else(|| bad(i)))
                .collect()
        }
        _ => {
            let keys = crate::read::keys_of_column(column)?;
            Ok((0..keys.len()).map(|i| keys.value(i).to_vec()).collect())
        }
    }
}

/// One contrib batch in our table's Arrow schema.
fn convert(batch: &RecordBatch, layout: &Layout) -> Result<RecordBatch> {
    let rows = batch.num_rows();
    let column = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| Error::schema(format!("contrib table has no {name} column")))
    };
    let serialized = entity_keys(column(ENTITY_KEY)?)?;
    let keys = serialized
        .iter()
        .map(|k| deserialize_entity_key(k))
        .collect::<Result<Vec<_>>>()?;
    let mut columns: Vec<Option<ArrayRef>> = vec![None; layout.arrow.fields().len()];
    columns[layout.entity_key] = Some(Arc::new(arrow_array::LargeBinaryArray::from_iter_values(
        serialized.iter(),
    )));
    for (index, array) in join_key_columns(layout, &keys)? {
        columns[index] = Some(array);
    }
    for (name, index) in [(EVENT_TS, layout.event_ts), (CREATED_TS, layout.created_ts)] {
        if let Some(c) = batch.column_by_name(name) {
            // Naive timestamps mean UTC in Feast: same numbers, now marked as UTC.
            let target = layout.arrow.field(index).data_type();
            let naive = DataType::Timestamp(arrow_schema::TimeUnit::Microsecond, None);
            let micros = arrow_cast::cast(&arrow_cast::cast(c, &naive)?, target)?;
            columns[index] = Some(micros);
        }
    }
    for col in &layout.features {
        let Some(c) = batch.column_by_name(&col.name) else {
            continue;
        };
        if col.kind == ColumnKind::Proto {
            return Err(Error::schema(format!(
                "feature {:?} (Feast ValueType {}) has no column form in the contrib store to \
                 migrate from",
                col.name, col.value_type
            )));
        }
        let target = layout.arrow.field(col.index).data_type();
        let cast = arrow_cast::cast(c, target)
            .map_err(|e| Error::schema(format!("feature {:?}: {e}", col.name)))?;
        columns[col.index] = Some(cast);
    }
    let columns = columns
        .into_iter()
        .zip(layout.arrow.fields())
        .map(|(c, f)| c.unwrap_or_else(|| new_null_array(f.data_type(), rows)))
        .collect();
    Ok(RecordBatch::try_new(layout.arrow.clone(), columns)?)
}

impl Store {
    /// Converts the contrib table `table` into our layout in place (see the module docs).
    pub async fn migrate(
        &self,
        table: &str,
        join_keys: &[ColumnSpec],
        features: &[ColumnSpec],
        dry_run: bool,
    ) -> Result<MigrationReport> {
        let id = self.table_id(table)?;
        let catalog = self.catalog().await?;
        // Before any work: on a catalog without the swap, staging would be wasted (and left).
        if let Some(why) = catalog.swap_unsupported() {
            return Err(Error::config(format!("cannot migrate {id}: {why}")));
        }
        let Some(location) = catalog.metadata_location(&id).await? else {
            return Err(Error::TableNotFound(id.to_string()));
        };
        let metadata = read_metadata(&self.file_io, &self.io.metadata, &id, &location).await?;
        let mut report = MigrationReport {
            previous_metadata: location.clone(),
            ..MigrationReport::default()
        };
        if metadata.properties().contains_key(PROP_VALUE_TYPES) {
            report.already_migrated = true;
            return Ok(report);
        }
        let files = match metadata.current_snapshot() {
            Some(s) => {
                SnapshotFiles::load(&self.file_io, &metadata, s, &self.io.metadata, None).await?
            }
            None => SnapshotFiles::default(),
        };
        if files.delete_files > 0 {
            return Err(Error::table_state(
                &id,
                "it has delete files; the contrib store never writes them, so this is not a \
                 table migrate understands",
            ));
        }
        report.files_read = files.data.len();
        report.rows_read = files.total_records();
        if dry_run {
            return Ok(report);
        }

        let staging = format!("{table}__migrating");
        self.drop_table(&staging).await?; // left over from an interrupted run
        let staged = self.table_id(&staging)?;
        // Until the swap, the staging table is ours alone: every failure drops it.
        let built = async {
            self.ensure_table(&staging, join_keys, features).await?;
            let state = self.stage(&files, &staging, &staged).await?;
            if catalog
                .swap(&id, &location, &state.metadata_location)
                .await?
            {
                Ok(state)
            } else {
                Err(Error::CommitConflict {
                    table: format!("{id} (changed during migration; nothing was replaced)"),
                    attempts: 1,
                })
            }
        };
        let staged_state = match built.await {
            Ok(state) => state,
            Err(e) => {
                if let Err(drop_err) = self.drop_table(&staging).await {
                    log::warn!(
                        "migrate {id}: could not drop the staging table {staged}: {drop_err}; \
                         drop it with `Store.drop_table({staging:?})`"
                    );
                    crate::metrics::cleanup_failed(&id, 1);
                }
                return Err(e.context(format!("migrate {id}")));
            }
        };
        // The swap landed: the staging files are the table's now, so the staging name is only
        // unregistered, never dropped (that would delete the migrated table's files).
        if let Err(e) = catalog.unregister(&staged).await {
            log::warn!(
                "migrate {id}: migrated, but the staging name {staged} is still registered \
                 ({e}); unregister it in the catalog without deleting its files"
            );
        }
        self.forget(&staged);
        self.forget(&id);
        report.rows_live =
            staged_state.files.total_records() - staged_state.files.total_position_deletes();
        Ok(report)
    }

    /// Upserts every contrib file into the staging table; returns its final state.
    async fn stage(
        &self,
        files: &SnapshotFiles,
        staging: &str,
        staged: &TableId,
    ) -> Result<Arc<TableState>> {
        // The staging table is ours alone: its layout stays what ensure_table made it.
        let layout = self.current(staged, Duration::ZERO).await?.layout.clone();
        for f in &files.data {
            let bytes = self.file_io.new_input(f.path())?.read().await?;
            self.io.data.add(bytes.len());
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()?;
            for batch in reader {
                let converted = convert(&batch?, &layout)?;
                upsert_batch(self, staging, converted).await?;
            }
        }
        // Small contrib files were upserted merge-on-read: hand over a table with one file per
        // bucket and no deletes, as a copy-on-write load would have left it.
        compact(self, staging, false).await?;
        self.current(staged, Duration::ZERO).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_keys_decode() {
        assert_eq!(hex_decode("00ff10").unwrap(), vec![0, 255, 16]);
        assert!(hex_decode("0").is_none() && hex_decode("zz").is_none());
    }
}
