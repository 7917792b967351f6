//! Arrow-native materialization: an offline-store result, as a stream of record batches in
//! Feast's Arrow types, becomes batches in the table schema that are upserted in bounded chunks.
//!
//! It stores exactly what the proto path (Feast's `_convert_arrow_to_proto`, then
//! `online_write_batch`) stores for the same rows, without a protobuf per value: the rules below
//! that look odd (NaN features become null, a null timestamp feature becomes Feast's NaN
//! timestamp, timestamp features keep whole seconds) are Feast's conversion rules.
//!
//! Chunks: the stream is cut into chunks of at most `chunk_rows` rows; each chunk is converted
//! (all of its values validated before any I/O) and committed as one snapshot. A bad value fails
//! its chunk before anything of that chunk is written; chunks committed before it stay, which is
//! harmless because every chunk is an idempotent upsert (re-running the materialization writes
//! the same rows). Duplicate keys across chunks resolve as within one batch: the newest event
//! timestamp wins, then the newest created timestamp, then the later row.

use std::sync::Arc;
use std::time::Duration;

use arrow_array::builder::LargeBinaryBuilder;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int32Type, Int64Type};
use arrow_array::{
    Array, ArrayRef, BooleanArray, GenericListArray, Int64Array, OffsetSizeTrait, PrimitiveArray,
    RecordBatch, TimestampMicrosecondArray, new_null_array,
};
use arrow_buffer::{BooleanBuffer, NullBuffer};
use arrow_schema::{ArrowError, DataType, Field, Schema, TimeUnit};

use crate::convert::{
    MICROS_PER_SECOND, NAN_TIMESTAMP, entity_key_header, push_entity_value, seconds_to_micros,
    table_batch,
};
use crate::error::{Error, Result};
use crate::schema::{Column, ColumnKind, Layout, Scalar};
use crate::store::Store;
use crate::write::{Token, WriteReport, stage_batch, upsert_batch};

/// Where the table's columns are in the offline-store result.
#[derive(Clone, Debug, Default)]
pub struct SourceColumns {
    /// (table column, source column) per join key; every join key of the table is required.
    pub join_keys: Vec<(String, String)>,
    /// (table column, source column) per feature written; table features not listed are null.
    pub features: Vec<(String, String)>,
    pub event_ts: String,
    pub created_ts: Option<String>,
}

/// What one `ingest` did: rows read from the stream, chunks committed, and the write reports of
/// the chunks summed (`snapshot_id` is the last chunk's).
#[derive(Debug, Default, Clone)]
pub struct IngestReport {
    pub rows_read: usize,
    pub chunks: usize,
    pub write: WriteReport,
}

/// A table column and the position of its source column.
struct Mapped {
    col: Column,
    source: usize,
}

/// The join-key columns of a stream, resolved: what the entity key is built from.
pub struct KeyColumns {
    /// Join keys sorted by name: Feast's entity-key encoding orders them so.
    keys: Vec<Mapped>,
    key_header: Vec<u8>,
}

/// The source columns resolved against a stream's schema and checked against the table.
pub struct Resolved {
    key: KeyColumns,
    features: Vec<Mapped>,
    event_ts: usize,
    created_ts: Option<usize>,
}

/// A source column mapped to `table_col`, if its type converts natively.
fn map_column(schema: &Schema, table_col: &Column, source: &str, what: &str) -> Result<Mapped> {
    let source = source_index(schema, source, what)?;
    if let Some(why) = unsupported(table_col, schema.field(source).data_type()) {
        return Err(Error::schema(why));
    }
    Ok(Mapped {
        col: table_col.clone(),
        source,
    })
}

/// Whether a source column of type `dt` holds values of Feast scalar kind `s` that the proto
/// path accepts and that convert without guessing. `in_list`: list elements, where Feast
/// rejects floats for integer lists.
fn accepts(s: Scalar, dt: &DataType, in_list: bool) -> bool {
    use DataType as D;
    match s {
        // Feast's proto path takes integers of any width (range-checked) and, for scalars,
        // floats: its pandas steps turn an integer column with nulls into float64 with NaN.
        Scalar::Int32 | Scalar::Int64 => dt.is_integer() || (!in_list && dt.is_floating()),
        Scalar::Float | Scalar::Double => dt.is_floating() || dt.is_integer(),
        Scalar::String => matches!(dt, D::Utf8 | D::LargeUtf8 | D::Utf8View),
        Scalar::Bytes => matches!(
            dt,
            D::Binary | D::LargeBinary | D::BinaryView | D::FixedSizeBinary(_)
        ),
        Scalar::Bool => matches!(dt, D::Boolean),
        Scalar::UnixTimestamp => matches!(dt, D::Timestamp(_, _)),
    }
}

/// Why a column cannot be converted natively, or None.
fn unsupported(col: &Column, dt: &DataType) -> Option<String> {
    let ok = *dt == DataType::Null
        || match col.kind {
            ColumnKind::Scalar(s) => accepts(s, dt, false),
            ColumnKind::List(s) => match dt {
                DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
                    *f.data_type() == DataType::Null || accepts(s, f.data_type(), true)
                }
                _ => false,
            },
            // Feast turns a set into `list(set(values))`, whose order depends on Python's
            // hashing: nothing to reproduce. Proto columns need Feast's Python converters.
            ColumnKind::Set(_) | ColumnKind::Proto => {
                return Some(format!(
                    "column {:?} has Feast ValueType {}, which only the proto path converts",
                    col.name, col.value_type
                ));
            }
        };
    (!ok).then(|| {
        format!(
            "column {:?} (Feast ValueType {}) cannot be read from Arrow type {dt}",
            col.name, col.value_type
        )
    })
}

fn source_index(schema: &Schema, name: &str, what: &str) -> Result<usize> {
    schema.index_of(name).map_err(|_| {
        Error::schema(format!(
            "{what} column {name:?} is not in the offline-store result (columns: {:?})",
            schema.fields().iter().map(|f| f.name()).collect::<Vec<_>>()
        ))
    })
}

fn timestamp_source(schema: &Schema, name: &str, what: &str) -> Result<usize> {
    let i = source_index(schema, name, what)?;
    match schema.field(i).data_type() {
        DataType::Timestamp(_, _) => Ok(i),
        dt => Err(Error::schema(format!(
            "{what} column {name:?} is {dt}, not an Arrow timestamp"
        ))),
    }
}

impl Resolved {
    /// Checks that `schema` provides every column the table needs in a type converted natively;
    /// a `SchemaMismatch` error says which does not (the caller may fall back to the proto path:
    /// nothing has been read or written yet).
    pub fn new(layout: &Layout, cols: &SourceColumns, schema: &Schema) -> Result<Self> {
        let key = KeyColumns::new(layout, &cols.join_keys, schema)?;
        let mut features = Vec::with_capacity(cols.features.len());
        for (name, source) in &cols.features {
            let col = layout.feature(name).ok_or_else(|| {
                Error::schema(format!(
                    "feature {name:?} is not a column of the table (run `feast apply` after \
                     adding features)"
                ))
            })?;
            features.push(map_column(schema, col, source, "feature")?);
        }
        Ok(Self {
            key,
            features,
            event_ts: timestamp_source(schema, &cols.event_ts, "event timestamp")?,
            created_ts: cols
                .created_ts
                .as_deref()
                .map(|c| timestamp_source(schema, c, "created timestamp"))
                .transpose()?,
        })
    }

    /// One source batch (of the schema this was resolved against) in the table schema. Every
    /// value is checked here; nothing is written. `first_row`: the batch's position in the
    /// stream, so errors name the offending row of the whole offline result.
    pub fn convert(
        &self,
        layout: &Layout,
        batch: &RecordBatch,
        first_row: usize,
    ) -> Result<RecordBatch> {
        let rows = batch.num_rows();
        let mut columns: Vec<Option<ArrayRef>> = vec![None; layout.arrow.fields().len()];
        let (typed_keys, entity_keys) = self.key.convert(layout, batch, first_row)?;
        columns[layout.entity_key] = Some(entity_keys);
        for (m, array) in self.key.keys.iter().zip(typed_keys) {
            columns[m.col.index] = Some(array);
        }
        for m in &self.features {
            let target = layout.arrow.field(m.col.index).data_type();
            columns[m.col.index] = Some(to_table_array(&m.col, target, batch.column(m.source))?);
        }
        let ts_type = layout.arrow.field(layout.event_ts).data_type();
        let event = event_micros(batch.column(self.event_ts), ts_type, "event timestamp")?;
        if let Some(row) = (0..rows).find(|&r| event.is_null(r)) {
            return Err(Error::input(format!(
                "event timestamp is null in row {} of the offline-store result",
                first_row + row
            )));
        }
        columns[layout.event_ts] = Some(Arc::new(event));
        if let Some(created) = self.created_ts {
            let created = event_micros(batch.column(created), ts_type, "created timestamp")?;
            columns[layout.created_ts] = Some(Arc::new(created));
        }
        table_batch(layout, columns, rows)
    }
}

impl KeyColumns {
    /// Checks that `schema` provides every join key of the table in a type converted natively.
    pub fn new(layout: &Layout, join_keys: &[(String, String)], schema: &Schema) -> Result<Self> {
        let mut keys = Vec::with_capacity(layout.join_keys.len());
        for col in &layout.join_keys {
            let (_, source) = join_keys
                .iter()
                .find(|(name, _)| *name == col.name)
                .ok_or_else(|| Error::schema(format!("join key {:?} is not mapped", col.name)))?;
            if !matches!(
                col.kind,
                ColumnKind::Scalar(Scalar::Int32 | Scalar::Int64 | Scalar::String | Scalar::Bytes)
            ) {
                return Err(Error::schema(format!(
                    "join key {:?} has Feast ValueType {}, which only the proto path serializes",
                    col.name, col.value_type
                )));
            }
            keys.push(map_column(schema, col, source, "join key")?);
        }
        if let Some((name, _)) = join_keys
            .iter()
            .find(|(name, _)| !layout.join_keys.iter().any(|c| c.name == *name))
        {
            return Err(Error::schema(format!(
                "{name:?} is not a join key of the table"
            )));
        }
        keys.sort_by(|a, b| a.col.name.cmp(&b.col.name));
        let names: Vec<&str> = keys.iter().map(|k| k.col.name.as_str()).collect();
        let key_header = entity_key_header(&names)?;

        Ok(Self { keys, key_header })
    }

    /// The join-key columns of `batch` in table types, and the entity key per row.
    fn convert(
        &self,
        layout: &Layout,
        batch: &RecordBatch,
        first_row: usize,
    ) -> Result<(Vec<ArrayRef>, ArrayRef)> {
        let typed = self
            .keys
            .iter()
            .map(|m| {
                to_table_array(
                    &m.col,
                    layout.arrow.field(m.col.index).data_type(),
                    batch.column(m.source),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let keys = self.entity_keys(&typed, batch.num_rows(), first_row)?;
        Ok((typed, keys))
    }

    /// The Iceberg bucket of each row's entity key (what a distributed write repartitions by).
    pub fn buckets(
        &self,
        layout: &Layout,
        batch: &RecordBatch,
        first_row: usize,
    ) -> Result<Vec<i32>> {
        let (_, keys) = self.convert(layout, batch, first_row)?;
        let keys = keys
            .as_any()
            .downcast_ref::<arrow_array::LargeBinaryArray>()
            .ok_or_else(|| Error::internal("entity keys are not large binary"))?;
        crate::read::buckets(keys, layout.buckets)
    }

    /// Feast's serialized entity key per row, from the join-key columns in table types.
    fn entity_keys(&self, typed: &[ArrayRef], rows: usize, first_row: usize) -> Result<ArrayRef> {
        let mut out = LargeBinaryBuilder::with_capacity(rows, rows * (self.key_header.len() + 24));
        let mut key = Vec::with_capacity(self.key_header.len() + 24 * typed.len());
        for row in 0..rows {
            key.clear();
            key.extend_from_slice(&self.key_header);
            for (m, array) in self.keys.iter().zip(typed) {
                if array.is_null(row) {
                    return Err(Error::input(format!(
                        "join key {:?} is null in row {} of the offline-store result",
                        m.col.name,
                        first_row + row
                    )));
                }
                let ColumnKind::Scalar(kind) = m.col.kind else {
                    return Err(Error::internal("join key is not a scalar"));
                };
                match kind {
                    Scalar::Int32 => {
                        let v = array.as_primitive::<Int32Type>().value(row);
                        push_entity_value(&mut key, kind, &v.to_le_bytes())?;
                    }
                    Scalar::Int64 => {
                        let v = array.as_primitive::<Int64Type>().value(row);
                        push_entity_value(&mut key, kind, &v.to_le_bytes())?;
                    }
                    Scalar::String => {
                        let v = array.as_string::<i32>().value(row);
                        push_entity_value(&mut key, kind, v.as_bytes())?;
                    }
                    Scalar::Bytes => {
                        let v = array.as_binary::<i64>().value(row);
                        push_entity_value(&mut key, kind, v)?;
                    }
                    _ => return Err(Error::internal("join key kind was checked")),
                }
            }
            out.append_value(&key);
        }
        Ok(Arc::new(out.finish()))
    }
}

// ---------------------------------------------------------------------------------------------
// Column conversion

/// Arrow's cast, failing on a value the target cannot hold (the default turns it into a null,
/// which would silently drop data).
fn cast(array: &ArrayRef, to: &DataType, column: &str) -> Result<ArrayRef> {
    let options = arrow_cast::CastOptions {
        safe: false,
        ..Default::default()
    };
    arrow_cast::cast_with_options(array, to, &options)
        .map_err(|e| Error::input(format!("column {column:?}: {e}")))
}

/// A float array with NaN turned into null: Feast's proto path tests scalars with
/// `pd.isnull`, which is true for NaN, and stores an unset `Value`.
fn nan_to_null(array: &ArrayRef) -> Result<ArrayRef> {
    fn without_nan<T: arrow_array::ArrowPrimitiveType>(
        a: &PrimitiveArray<T>,
        is_nan: impl Fn(T::Native) -> bool,
    ) -> ArrayRef {
        let values = a.values();
        let valid = BooleanBuffer::collect_bool(a.len(), |i| a.is_valid(i) && !is_nan(values[i]));
        Arc::new(PrimitiveArray::<T>::new(
            values.clone(),
            Some(NullBuffer::new(valid)),
        ))
    }
    Ok(match array.data_type() {
        DataType::Float32 => without_nan(array.as_primitive::<Float32Type>(), f32::is_nan),
        DataType::Float64 => without_nan(array.as_primitive::<Float64Type>(), f64::is_nan),
        dt => return Err(Error::internal(format!("nan_to_null on {dt}"))),
    })
}

fn units_per_second(unit: TimeUnit) -> i64 {
    match unit {
        TimeUnit::Second => 1,
        TimeUnit::Millisecond => 1_000,
        TimeUnit::Microsecond => MICROS_PER_SECOND,
        TimeUnit::Nanosecond => 1_000_000_000,
    }
}

/// The raw epoch values of a timestamp array (UTC whatever its zone: Arrow stores instants) and
/// their unit.
fn epoch_values(array: &ArrayRef, column: &str) -> Result<(Int64Array, TimeUnit)> {
    let DataType::Timestamp(unit, _) = array.data_type() else {
        return Err(Error::schema(format!(
            "column {column:?} is {}, not a timestamp",
            array.data_type()
        )));
    };
    let raw = cast(array, &DataType::Int64, column)?;
    Ok((raw.as_primitive::<Int64Type>().clone(), *unit))
}

/// An event or created timestamp in microseconds. Sub-microsecond digits are dropped towards
/// the past, as `Timestamp.to_pydatetime()` does on the proto path; nulls stay null.
fn event_micros(
    array: &ArrayRef,
    target: &DataType,
    column: &str,
) -> Result<TimestampMicrosecondArray> {
    let (raw, unit) = epoch_values(array, column)?;
    let per_second = units_per_second(unit);
    let micros = raw.try_unary::<_, Int64Type, Error>(|v| {
        if per_second >= MICROS_PER_SECOND {
            Ok(v.div_euclid(per_second / MICROS_PER_SECOND))
        } else {
            v.checked_mul(MICROS_PER_SECOND / per_second)
                .ok_or_else(|| {
                    Error::input(format!("column {column:?}: timestamp {v} is out of range"))
                })
        }
    })?;
    Ok(
        TimestampMicrosecondArray::new(micros.values().clone(), micros.nulls().cloned())
            .with_timezone_opt(timezone(target)),
    )
}

/// A timestamp feature as the proto path stores it: whole seconds (numpy's `datetime64[s]`
/// floors), in microseconds; a null is Feast's NaN timestamp (NaT as an integer), not null.
fn feature_timestamps(array: &ArrayRef, target: &DataType, column: &str) -> Result<ArrayRef> {
    let (raw, unit) = epoch_values(array, column)?;
    let per_second = units_per_second(unit);
    let mut micros = Vec::with_capacity(raw.len());
    for v in raw.iter() {
        micros.push(match v {
            Some(v) => seconds_to_micros(v.div_euclid(per_second), column)?,
            None => NAN_TIMESTAMP,
        });
    }
    Ok(Arc::new(
        TimestampMicrosecondArray::from(micros).with_timezone_opt(timezone(target)),
    ))
}

/// The timezone of the table's timestamp type, so converted columns carry the exact type.
fn timezone(target: &DataType) -> Option<Arc<str>> {
    match target {
        DataType::Timestamp(_, tz) => tz.clone(),
        _ => None,
    }
}

fn scalar_array(s: Scalar, target: &DataType, source: &ArrayRef, column: &str) -> Result<ArrayRef> {
    match s {
        Scalar::UnixTimestamp => feature_timestamps(source, target, column),
        Scalar::Float | Scalar::Double => nan_to_null(&cast(source, target, column)?),
        Scalar::Int32 | Scalar::Int64 if source.data_type().is_floating() => {
            // `int(x)` on the proto path: NaN is null, fractions truncate, overflow fails.
            let floats = nan_to_null(&cast(source, &DataType::Float64, column)?)?;
            cast(&floats, target, column)
        }
        _ => cast(source, target, column),
    }
}

/// A null list element as Feast's `_sanitize_list_value` replaces it: the type's default, or
/// NaN where numpy has already turned the null into NaN (float lists), or the NaN timestamp.
fn list_values(s: Scalar, target: &DataType, values: &ArrayRef, column: &str) -> Result<ArrayRef> {
    let converted = match s {
        Scalar::UnixTimestamp => return feature_timestamps(values, target, column),
        _ => cast(values, target, column)?,
    };
    let Some(nulls) = converted.logical_nulls().filter(|n| n.null_count() > 0) else {
        return Ok(converted);
    };
    let default: ArrayRef = match s {
        Scalar::Float => Arc::new(arrow_array::Float32Array::from(vec![f32::NAN])),
        Scalar::Double => Arc::new(arrow_array::Float64Array::from(vec![f64::NAN])),
        Scalar::Int32 => Arc::new(arrow_array::Int32Array::from(vec![0])),
        Scalar::Int64 => Arc::new(Int64Array::from(vec![0])),
        Scalar::Bool => Arc::new(BooleanArray::from(vec![false])),
        Scalar::String => Arc::new(arrow_array::StringArray::from(vec![""])),
        Scalar::Bytes => Arc::new(arrow_array::LargeBinaryArray::from(vec![&b""[..]])),
        Scalar::UnixTimestamp => return Err(Error::internal("handled above")),
    };
    let default = cast(&default, target, column)?;
    let valid = BooleanArray::new(nulls.into_inner(), None);
    Ok(arrow_select::zip::zip(
        &valid,
        &converted,
        &arrow_array::Scalar::new(default),
    )?)
}

fn rebuild_list<O: OffsetSizeTrait>(
    list: &GenericListArray<O>,
    field: &Arc<Field>,
    s: Scalar,
    column: &str,
) -> Result<ArrayRef> {
    // Only the referenced slice of the child: a sliced batch keeps its parent's whole child.
    let first = list.value_offsets()[0].as_usize();
    let last = list.value_offsets()[list.len()].as_usize();
    let values = list.values().slice(first, last - first);
    let values = list_values(s, field.data_type(), &values, column)?;
    let offsets: Vec<i32> = list
        .value_offsets()
        .iter()
        .map(|o| i32::try_from(o.as_usize() - first))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::input(format!("column {column:?}: list values exceed 2^31")))?;
    Ok(Arc::new(arrow_array::ListArray::try_new(
        field.clone(),
        arrow_buffer::OffsetBuffer::new(offsets.into()),
        values,
        list.nulls().cloned(),
    )?))
}

fn list_array(s: Scalar, target: &DataType, source: &ArrayRef, column: &str) -> Result<ArrayRef> {
    let DataType::List(field) = target else {
        return Err(Error::internal(format!(
            "column {column:?} is not an Arrow list"
        )));
    };
    match source.data_type() {
        DataType::List(_) => rebuild_list(source.as_list::<i32>(), field, s, column),
        DataType::LargeList(_) => rebuild_list(source.as_list::<i64>(), field, s, column),
        // Fixed-size lists (embeddings) become variable lists first; no element is lost.
        DataType::FixedSizeList(f, _) => {
            let as_list = cast(source, &DataType::List(f.clone()), column)?;
            rebuild_list(as_list.as_list::<i32>(), field, s, column)
        }
        dt => Err(Error::schema(format!(
            "column {column:?} is {dt}, not a list"
        ))),
    }
}

/// One source column in the table column's exact Arrow type, with the proto path's rules.
fn to_table_array(col: &Column, target: &DataType, source: &ArrayRef) -> Result<ArrayRef> {
    if *source.data_type() == DataType::Null {
        return Ok(new_null_array(target, source.len()));
    }
    match col.kind {
        ColumnKind::Scalar(s) => scalar_array(s, target, source, &col.name),
        ColumnKind::List(s) => list_array(s, target, source, &col.name),
        ColumnKind::Set(_) | ColumnKind::Proto => Err(Error::internal(format!(
            "column {:?} was checked as convertible",
            col.name
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// The stream

async fn commit_chunk(
    store: &Store,
    table: &str,
    layout: &Layout,
    pending: &mut Vec<RecordBatch>,
    report: &mut IngestReport,
) -> Result<()> {
    let batch = arrow_select::concat::concat_batches(&layout.arrow, pending.iter())?;
    pending.clear();
    report.write += &upsert_batch(store, table, batch).await?;
    report.chunks += 1;
    Ok(())
}

/// Reads the whole stream and converts it for the table (every value checked before any I/O).
async fn convert_all(
    store: &Store,
    table: &str,
    cols: &SourceColumns,
    schema: &Schema,
    batches: impl Iterator<Item = std::result::Result<RecordBatch, ArrowError>> + Send,
) -> Result<(Arc<Layout>, usize, RecordBatch)> {
    let id = store.table_id(table)?;
    let state = store.current(&id, Duration::ZERO).await?;
    let layout = state.layout.clone();
    let resolved = Resolved::new(&layout, cols, schema)
        .map_err(|e| e.context(format!("materializing into {id}")))?;
    let mut parts = Vec::new();
    let mut rows = 0;
    for batch in batches {
        let batch = batch.map_err(|e| Error::input(format!("reading the offline result: {e}")))?;
        parts.push(
            resolved
                .convert(&layout, &batch, rows)
                .map_err(|e| e.context(format!("materializing into {id}")))?,
        );
        rows += batch.num_rows();
    }
    let all = arrow_select::concat::concat_batches(&layout.arrow, &parts)?;
    Ok((layout, rows, all))
}

/// Stages every row of the stream (one task's share of a distributed materialization): the
/// rows' buckets are written under the job's attempt directory and described by the token the
/// driver commits (`write::stage`). Returns the rows read and the token.
pub async fn stage(
    store: &Store,
    table: &str,
    cols: &SourceColumns,
    schema: &Schema,
    batches: impl Iterator<Item = std::result::Result<RecordBatch, ArrowError>> + Send,
    job: &str,
    attempt: &str,
) -> Result<(usize, Token)> {
    let (_, rows, batch) = convert_all(store, table, cols, schema, batches).await?;
    let token = stage_batch(store, table, batch, job, attempt).await?;
    Ok((rows, token))
}

/// The Iceberg bucket of each row's entity key, built from the join-key columns `join_keys`
/// (table column, source column) of the stream.
pub async fn buckets(
    store: &Store,
    table: &str,
    join_keys: &[(String, String)],
    schema: &Schema,
    batches: impl Iterator<Item = std::result::Result<RecordBatch, ArrowError>> + Send,
) -> Result<Vec<i32>> {
    let id = store.table_id(table)?;
    let state = store.current(&id, Duration::ZERO).await?;
    let keys = KeyColumns::new(&state.layout, join_keys, schema).map_err(|e| e.context(&id))?;
    let mut out = Vec::new();
    for batch in batches {
        let batch = batch.map_err(|e| Error::input(format!("reading the offline result: {e}")))?;
        out.extend(keys.buckets(&state.layout, &batch, out.len())?);
    }
    Ok(out)
}

/// Checks a stream's schema against the table without reading or writing anything.
pub async fn check(
    store: &Store,
    table: &str,
    cols: &SourceColumns,
    schema: &Schema,
) -> Result<()> {
    let id = store.table_id(table)?;
    let state = store.current(&id, Duration::ZERO).await?;
    Resolved::new(&state.layout, cols, schema)
        .map(|_| ())
        .map_err(|e| e.context(id))
}

/// Upserts the rows of `batches` (all of `schema`) into `table`, one snapshot per chunk of at
/// most `chunk_rows` rows. Memory holds one chunk in the table schema besides the batch being
/// read, whatever the stream's length.
pub async fn ingest(
    store: &Store,
    table: &str,
    cols: &SourceColumns,
    schema: &Schema,
    batches: impl Iterator<Item = std::result::Result<RecordBatch, ArrowError>> + Send,
    chunk_rows: usize,
) -> Result<IngestReport> {
    if chunk_rows == 0 {
        return Err(Error::config("chunk_rows must be at least 1"));
    }
    let id = store.table_id(table)?;
    let state = store.current(&id, Duration::ZERO).await?;
    let layout = state.layout.clone();
    let resolved = Resolved::new(&layout, cols, schema)
        .map_err(|e| e.context(format!("materializing into {id}")))?;
    let mut report = IngestReport::default();
    let mut pending = Vec::new();
    let mut pending_rows = 0;
    for batch in batches {
        let batch = batch.map_err(|e| Error::input(format!("reading the offline result: {e}")))?;
        report.rows_read += batch.num_rows();
        let mut offset = 0;
        while offset < batch.num_rows() {
            let take = (chunk_rows - pending_rows).min(batch.num_rows() - offset);
            let first_row = report.rows_read - batch.num_rows() + offset;
            let converted = resolved
                .convert(&layout, &batch.slice(offset, take), first_row)
                .map_err(|e| e.context(format!("materializing into {id}")))?;
            pending.push(converted);
            pending_rows += take;
            offset += take;
            if pending_rows == chunk_rows {
                commit_chunk(store, table, &layout, &mut pending, &mut report).await?;
                pending_rows = 0;
            }
        }
    }
    if pending_rows > 0 {
        commit_chunk(store, table, &layout, &mut pending, &mut report).await?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use arrow_array::{
        Float64Array, Int32Array, LargeBinaryArray, ListArray, StringArray,
        TimestampNanosecondArray, TimestampSecondArray,
    };

    use super::*;
    use crate::convert::serialize_entity_key;
    use crate::proto::value::Val;
    use crate::proto::{EntityKey, Value};

    const UTC: &str = "+00:00";

    fn column(name: &str, value_type: i32) -> Column {
        Column {
            name: name.into(),
            value_type,
            kind: ColumnKind::from_value_type(value_type).unwrap(),
            index: 0,
        }
    }

    fn micros_type() -> DataType {
        DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into()))
    }

    fn list_of(dt: DataType) -> DataType {
        DataType::List(Arc::new(Field::new("element", dt, true)))
    }

    #[test]
    fn float_nan_becomes_null_and_narrows_like_protobuf() {
        let source: ArrayRef = Arc::new(Float64Array::from(vec![Some(0.1), Some(f64::NAN), None]));
        let out = to_table_array(&column("f", 6), &DataType::Float32, &source).unwrap();
        let out = out.as_primitive::<Float32Type>();
        assert_eq!(out.value(0), 0.1f64 as f32);
        assert!(out.is_null(1) && out.is_null(2));
    }

    #[test]
    fn integers_are_range_checked_and_floats_truncate() {
        let wide: ArrayRef = Arc::new(Int64Array::from(vec![1, 1 << 40]));
        let err = to_table_array(&column("n", 3), &DataType::Int32, &wide).unwrap_err();
        assert!(matches!(err, Error::InvalidInput(m) if m.contains("\"n\"")));
        // Feast's pandas steps turn an int column with nulls into float64 with NaN.
        let floats: ArrayRef = Arc::new(Float64Array::from(vec![Some(7.9), Some(f64::NAN)]));
        let out = to_table_array(&column("n", 4), &DataType::Int64, &floats).unwrap();
        let out = out.as_primitive::<Int64Type>();
        assert_eq!(out.value(0), 7);
        assert!(out.is_null(1));
    }

    #[test]
    fn event_timestamps_floor_to_micros_and_keep_nulls() {
        let ns: ArrayRef = Arc::new(TimestampNanosecondArray::from(vec![
            Some(1_500),
            Some(-1_500),
            None,
        ]));
        let out = event_micros(&ns, &micros_type(), "e").unwrap();
        assert_eq!(out.value(0), 1);
        assert_eq!(out.value(1), -2);
        assert!(out.is_null(2));
        assert_eq!(out.data_type(), &micros_type());
        let s: ArrayRef = Arc::new(TimestampSecondArray::from(vec![i64::MAX]));
        assert!(event_micros(&s, &micros_type(), "e").is_err());
    }

    #[test]
    fn timestamp_features_keep_whole_seconds_and_nan_for_null() {
        let ns: ArrayRef = Arc::new(
            TimestampNanosecondArray::from(vec![Some(2_999_999_999), Some(-1), None])
                .with_timezone("America/New_York"),
        );
        let out = to_table_array(&column("t", 8), &micros_type(), &ns).unwrap();
        let out = out.as_primitive::<arrow_array::types::TimestampMicrosecondType>();
        assert_eq!(
            out.values().to_vec(),
            vec![2_000_000, -1_000_000, NAN_TIMESTAMP]
        );
        assert_eq!(out.null_count(), 0);
    }

    #[test]
    fn null_list_elements_get_feast_defaults() {
        let values: ArrayRef = Arc::new(StringArray::from(vec![Some("a"), None, Some("b")]));
        let offsets = arrow_buffer::OffsetBuffer::new(vec![0, 2, 3, 3].into());
        let field = Arc::new(Field::new("item", DataType::Utf8, true));
        let nulls = NullBuffer::from(vec![true, true, false]);
        let source: ArrayRef = Arc::new(ListArray::new(field, offsets, values, Some(nulls)));
        // A slice, so the child holds values outside the rows converted.
        let source = source.slice(1, 2);
        let out = to_table_array(&column("l", 12), &list_of(DataType::Utf8), &source).unwrap();
        let out = out.as_list::<i32>();
        assert_eq!(out.len(), 2);
        assert_eq!(out.value(0).as_string::<i32>().value(0), "b");
        assert!(out.is_null(1));

        let floats =
            ListArray::from_iter_primitive::<Float32Type, _, _>([Some(vec![Some(1.5), None])]);
        let floats: ArrayRef = Arc::new(floats);
        let out = to_table_array(&column("l", 16), &list_of(DataType::Float32), &floats).unwrap();
        let items = out.as_list::<i32>().value(0);
        let items = items.as_primitive::<Float32Type>();
        assert_eq!(items.value(0), 1.5);
        assert!(items.value(1).is_nan() && items.null_count() == 0);

        let ints = ListArray::from_iter_primitive::<Int32Type, _, _>([Some(vec![None, Some(4)])]);
        let ints: ArrayRef = Arc::new(ints);
        let out = to_table_array(&column("l", 13), &list_of(DataType::Int32), &ints).unwrap();
        let items = out.as_list::<i32>().value(0);
        assert_eq!(
            items.as_primitive::<Int32Type>().values().to_vec(),
            vec![0, 4]
        );
    }

    #[test]
    fn unsupported_types_say_why() {
        assert!(unsupported(&column("s", 2), &DataType::Int64).is_some());
        assert!(unsupported(&column("set", 24), &list_of(DataType::Int64)).is_some());
        assert!(unsupported(&column("map", 20), &DataType::Binary).is_some());
        assert!(unsupported(&column("li", 14), &list_of(DataType::Float64)).is_some());
        assert!(unsupported(&column("li", 14), &list_of(DataType::Int32)).is_none());
        assert!(unsupported(&column("i", 4), &DataType::Null).is_none());
    }

    #[test]
    fn entity_keys_match_the_proto_encoding() {
        let mapped = |name: &str, value_type| Mapped {
            col: column(name, value_type),
            source: 0,
        };
        // Sorted by name, as `Resolved::new` leaves them.
        let keys = vec![
            mapped("driver_id", 4),
            mapped("n", 3),
            mapped("raw", 1),
            mapped("zone", 2),
        ];
        let resolved = KeyColumns {
            key_header: entity_key_header(&["driver_id", "n", "raw", "zone"]).unwrap(),
            keys,
        };
        let typed: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(vec![1001, -7])),
            Arc::new(Int32Array::from(vec![3, 0])),
            Arc::new(LargeBinaryArray::from(vec![&b"\x00\xff"[..], b""])),
            Arc::new(StringArray::from(vec!["eu", "héllo"])),
        ];
        let out = resolved.entity_keys(&typed, 2, 0).unwrap();
        let out = out.as_binary::<i64>();
        let expect = |id, n, raw: &[u8], zone: &str| {
            let v = |val| Value { val: Some(val) };
            serialize_entity_key(&EntityKey {
                join_keys: vec!["zone".into(), "raw".into(), "n".into(), "driver_id".into()],
                entity_values: vec![
                    v(Val::StringVal(zone.into())),
                    v(Val::BytesVal(raw.to_vec())),
                    v(Val::Int32Val(n)),
                    v(Val::Int64Val(id)),
                ],
            })
            .unwrap()
        };
        assert_eq!(out.value(0), expect(1001, 3, b"\x00\xff", "eu"));
        assert_eq!(out.value(1), expect(-7, 0, b"", "héllo"));
        let with_null: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(vec![Some(1), None])),
            typed[1].clone(),
            typed[2].clone(),
            typed[3].clone(),
        ];
        let err = resolved.entity_keys(&with_null, 2, 40).unwrap_err();
        assert!(
            matches!(err, Error::InvalidInput(m) if m.contains("\"driver_id\" is null in row 41"))
        );
    }

    #[test]
    fn chunk_reports_sum_every_field() {
        let chunk = |n: usize, snapshot| WriteReport {
            rows_written: n,
            rows_ignored_older: n + 1,
            buckets: n + 2,
            files_added: n + 3,
            files_removed: n + 4,
            delete_files_added: n + 5,
            merge_on_read_buckets: n + 6,
            attempts: 1,
            replanned_buckets: n + 7,
            timings: Default::default(),
            snapshot_id: snapshot,
        };
        let mut total = WriteReport::default();
        total += &chunk(10, Some(1));
        total += &chunk(20, Some(2));
        total += &chunk(0, None); // a chunk whose rows were all older commits nothing
        assert_eq!(
            (total.rows_written, total.rows_ignored_older, total.buckets),
            (30, 33, 36)
        );
        assert_eq!((total.files_added, total.files_removed), (39, 42));
        assert_eq!(
            (total.delete_files_added, total.merge_on_read_buckets),
            (45, 48)
        );
        assert_eq!((total.attempts, total.snapshot_id), (3, Some(2)));
        assert_eq!(total.replanned_buckets, 51);
    }
}
