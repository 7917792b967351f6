//! Feast's `GetOnlineFeaturesResponse` results encoded straight from the rows found. A
//! multi-view read hands Python one serialized fragment that protobuf's `MergeFromString`
//! appends to the response Feast is building: no `Value` object per cell, which at 5 views x
//! 100 keys is what Python's garbage collector kept pausing reads for.

use std::borrow::Cow;

use super::Hit;
use crate::proto::{push_len_field, push_varint_field};
use crate::schema::Layout;

/// A feature a view's request asks for, in response order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    /// A stored feature. A name the table lacks is NOT_FOUND, as `online_read` leaves it out.
    Feature(String),
    /// A join key listed among the view's features: answered from the entity key, like
    /// `online_read` does.
    JoinKey(String),
}

/// `feast.serving.FieldStatus` values.
const PRESENT: u8 = 1;
const NOT_FOUND: u8 = 3;

/// Field numbers: `GetOnlineFeaturesResponse.results`, and `FeatureVector`'s three lists.
const RESULTS: u32 = 2;
const VALUES: u32 = 1;
const STATUSES: u32 = 2;
const EVENT_TIMESTAMPS: u32 = 3;

/// A `google.protobuf.Timestamp` of an event time in micros, as Python's
/// `Timestamp.FromDatetime` makes it: seconds rounded down, nanos never negative.
fn timestamp(micros: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    push_varint_field(&mut out, 1, micros.div_euclid(1_000_000).cast_unsigned());
    push_varint_field(
        &mut out,
        2,
        (micros.rem_euclid(1_000_000) * 1000).cast_unsigned(),
    );
    out
}

/// Appends one `results` entry per wanted feature, each covering every row of `hits` (the
/// request's rows: a row not found, or expired, is NOT_FOUND with an unset value and an unset
/// timestamp, as Feast's base path builds it). Returns how many cells are PRESENT, for Feast's
/// per-view status metric. `key_value(name, row)` is the request's serialized value of join key
/// `name` at `row`, if this view's entity key has that key.
pub fn push_feature_vectors<'a>(
    out: &mut Vec<u8>,
    layout: &Layout,
    hits: &[Option<Hit>],
    wanted: &[Wanted],
    key_value: impl Fn(&str, usize) -> Option<&'a [u8]>,
) -> u64 {
    let timestamps: Vec<Vec<u8>> = hits
        .iter()
        .map(|h| h.as_ref().map_or_else(Vec::new, |h| timestamp(h.version.0)))
        .collect();
    let mut present = 0;
    let mut vector = Vec::new();
    let mut statuses = Vec::with_capacity(hits.len());
    for w in wanted {
        vector.clear();
        statuses.clear();
        let column = match w {
            Wanted::Feature(name) => layout.feature(name),
            Wanted::JoinKey(_) => None,
        };
        for (row, hit) in hits.iter().enumerate() {
            let value: Option<Cow<'_, [u8]>> = match (hit, w) {
                (None, _) => None,
                (Some(hit), Wanted::Feature(_)) => {
                    column.map(|c| Cow::Owned(hit.block.value(c, hit.row)))
                }
                (Some(_), Wanted::JoinKey(name)) => key_value(name, row).map(Cow::Borrowed),
            };
            push_len_field(&mut vector, VALUES, value.as_deref().unwrap_or_default());
            statuses.push(if value.is_some() { PRESENT } else { NOT_FOUND });
            present += u64::from(value.is_some());
        }
        // Packed: every status is one byte, which is its varint.
        push_len_field(&mut vector, STATUSES, &statuses);
        for ts in &timestamps {
            push_len_field(&mut vector, EVENT_TIMESTAMPS, ts);
        }
        push_len_field(out, RESULTS, &vector);
    }
    present
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_down_like_from_datetime() {
        // 1969-12-31T23:59:59.5: seconds -1 and 500_000_000 nanos, never -500_000_000.
        let mut expect = Vec::new();
        push_varint_field(&mut expect, 1, (-1i64).cast_unsigned());
        push_varint_field(&mut expect, 2, 500_000_000);
        assert_eq!(timestamp(-500_000), expect);
        assert!(timestamp(0).is_empty());
        assert_eq!(timestamp(1_000_001), vec![8, 1, 16, 0xe8, 0x07]);
    }
}
