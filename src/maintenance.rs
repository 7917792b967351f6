//! Automatic maintenance: snapshot retention and deletion of files no retained snapshot needs.
//!
//! Runs inside every commit (expired snapshots are removed by the same metadata update that adds
//! the new snapshot), so storage stays bounded with no manual step. A replaced snapshot is kept
//! for a grace period after it stopped being current, so readers in other processes that cached
//! it keep finding its files until they refresh.

use std::collections::HashSet;

use iceberg::spec::{MAIN_BRANCH, Snapshot, TableMetadata};

/// Snapshot ids that branches or tags other than main point at. iceberg-rust keeps `refs`
/// crate-private, so they are read from the metadata's JSON form.
fn other_refs(md: &TableMetadata) -> HashSet<i64> {
    let Ok(json) = serde_json::to_value(md) else {
        return HashSet::new();
    };
    json.get("refs")
        .and_then(|r| r.as_object())
        .map(|refs| {
            refs.iter()
                .filter(|(name, _)| name.as_str() != MAIN_BRANCH)
                .filter_map(|(_, r)| r.get("snapshot-id").and_then(serde_json::Value::as_i64))
                .collect()
        })
        .unwrap_or_default()
}

/// Snapshots on the main branch's history that retention lets go.
///
/// `pending_new`: a new snapshot is about to become current (it counts towards `keep` and the
/// current snapshot is replaced "now"). A snapshot at position `p` of the history (0 = current)
/// is kept while `p < keep`, or while it was replaced less than `grace_ms` ago; snapshots that
/// another branch or tag references are never expired here.
pub fn expirable(
    md: &TableMetadata,
    pending_new: bool,
    now_ms: i64,
    keep: usize,
    grace_ms: i64,
) -> Vec<i64> {
    let referenced = other_refs(md);
    let mut out = Vec::new();
    let mut replaced_at = now_ms;
    let mut position = usize::from(pending_new);
    let mut next: Option<&Snapshot> = md.current_snapshot().map(AsRef::as_ref);
    let mut first = true;
    while let Some(s) = next {
        // The current snapshot is only "replaced" when a new one is pending.
        let replaced = pending_new || !first;
        if replaced
            && position >= keep
            && now_ms - replaced_at >= grace_ms
            && !referenced.contains(&s.snapshot_id())
        {
            out.push(s.snapshot_id());
        }
        replaced_at = s.timestamp_ms();
        position += 1;
        first = false;
        next = s
            .parent_snapshot_id()
            .and_then(|p| md.snapshot_by_id(p))
            .map(AsRef::as_ref);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use iceberg::TableUpdate;
    use iceberg::spec::{
        FormatVersion, NestedField, Operation, PrimitiveType, Schema, SnapshotReference,
        SnapshotRetention, SortOrder, Summary, TableMetadataBuilder, Type, UnboundPartitionSpec,
    };
    use std::collections::HashMap;

    fn table_with_history(timestamps: &[i64]) -> TableMetadata {
        let schema = Schema::builder()
            .with_fields([
                NestedField::required(1, "k", Type::Primitive(PrimitiveType::Long)).into(),
            ])
            .build()
            .unwrap();
        let mut b = TableMetadataBuilder::new(
            schema,
            UnboundPartitionSpec::builder().build(),
            SortOrder::unsorted_order(),
            "memory://t".into(),
            FormatVersion::V2,
            HashMap::new(),
        )
        .unwrap();
        let mut parent = None;
        for (i, ts) in timestamps.iter().enumerate() {
            let id = i as i64 + 1;
            let snap = Snapshot::builder()
                .with_snapshot_id(id)
                .with_parent_snapshot_id(parent)
                .with_sequence_number(id)
                .with_timestamp_ms(*ts)
                .with_manifest_list(format!("memory://t/m{id}.avro"))
                .with_summary(Summary {
                    operation: Operation::Append,
                    additional_properties: HashMap::new(),
                })
                .with_schema_id(0)
                .build();
            b = TableUpdate::AddSnapshot { snapshot: snap }
                .apply(b)
                .unwrap();
            b = TableUpdate::SetSnapshotRef {
                ref_name: MAIN_BRANCH.into(),
                reference: SnapshotReference::new(id, SnapshotRetention::branch(None, None, None)),
            }
            .apply(b)
            .unwrap();
            parent = Some(id);
        }
        b.build().unwrap().metadata
    }

    #[test]
    fn keeps_current_and_snapshots_inside_grace() {
        // Snapshots 1..4 committed at t=1000,2000,3000,4000; now = 10_000.
        let md = table_with_history(&[1000, 2000, 3000, 4000]);
        // No pending commit, keep 1, no grace: everything but the current goes.
        let mut e = expirable(&md, false, 10_000, 1, 0);
        e.sort();
        assert_eq!(e, vec![1, 2, 3]);
        // Grace 7 s: snapshot 3 was replaced at 4000 (6 s ago) and stays; 2 replaced at 3000 goes.
        let mut e = expirable(&md, false, 10_000, 1, 7_000);
        e.sort();
        assert_eq!(e, vec![1, 2]);
        // A pending commit replaces 4 now: with grace it stays; without it goes too.
        assert!(!expirable(&md, true, 10_000, 1, 1).contains(&4));
        assert!(expirable(&md, true, 10_000, 1, 0).contains(&4));
        // keep = 3 with a pending commit: new, 4 and 3 stay.
        let mut e = expirable(&md, true, 10_000, 3, 0);
        e.sort();
        assert_eq!(e, vec![1, 2]);
    }
}
