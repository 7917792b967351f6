//! Feast protos <-> Arrow, and Feast's entity-key encoding.
//!
//! Write side: serialized `Value` protos become one Arrow column per feature in the table's
//! exact Arrow type; a value of the wrong kind is an error naming the column (never a silent
//! coercion or drop). Read side: one Arrow cell becomes one serialized `Value`.

use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Float32Builder, Float64Builder, Int32Builder, Int64Builder, LargeBinaryBuilder,
    ListBuilder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int32Type, Int64Type, TimestampMicrosecondType,
};
use arrow_array::{Array, ArrayRef, RecordBatch, new_null_array};
use arrow_schema::{DataType, FieldRef};
use prost::Message;

use crate::error::{Error, Result};
use crate::proto::value::Val;
use crate::proto::{self, EntityKey, Value};
use crate::schema::{Column, ColumnKind, Layout, Scalar};

pub(crate) const MICROS_PER_SECOND: i64 = 1_000_000;

/// The `Value` oneof field of `null_val`.
const NULL_TAG: u32 = 19;

/// Feast's NaN timestamp: `unix_timestamp_val = -2**63`, kept as the same instant in microseconds
/// so it round-trips instead of overflowing.
pub(crate) const NAN_TIMESTAMP: i64 = i64::MIN;

pub(crate) fn seconds_to_micros(secs: i64, column: &str) -> Result<i64> {
    if secs == NAN_TIMESTAMP {
        return Ok(NAN_TIMESTAMP);
    }
    secs.checked_mul(MICROS_PER_SECOND).ok_or_else(|| {
        Error::input(format!(
            "column {column:?}: unix timestamp {secs} s is out of range"
        ))
    })
}

fn micros_to_seconds(micros: i64) -> i64 {
    if micros == NAN_TIMESTAMP {
        NAN_TIMESTAMP
    } else {
        micros.div_euclid(MICROS_PER_SECOND)
    }
}

// ---------------------------------------------------------------------------------------------
// Entity keys

/// Feast's `serialize_entity_key` (version 3) from a serialized `EntityKey` proto. Join keys are
/// sorted by name exactly as Feast sorts them (Unicode code points = UTF-8 byte order).
pub fn serialize_entity_key(key: &EntityKey) -> Result<Vec<u8>> {
    if key.join_keys.len() != key.entity_values.len() {
        return Err(Error::input(format!(
            "entity key has {} join keys but {} values",
            key.join_keys.len(),
            key.entity_values.len()
        )));
    }
    let mut pairs: Vec<(&String, &Value)> = key.join_keys.iter().zip(&key.entity_values).collect();
    pairs.sort_by(|a, b| a.0.cmp(b.0));
    let names: Vec<&str> = pairs.iter().map(|(name, _)| name.as_str()).collect();
    let mut out = entity_key_header(&names)?;
    for (name, value) in &pairs {
        let (kind, bytes): (Scalar, Vec<u8>) = match &value.val {
            Some(Val::StringVal(s)) => (Scalar::String, s.as_bytes().to_vec()),
            Some(Val::BytesVal(b)) => (Scalar::Bytes, b.clone()),
            Some(Val::Int32Val(v)) => (Scalar::Int32, v.to_le_bytes().to_vec()),
            Some(Val::Int64Val(v)) => (Scalar::Int64, v.to_le_bytes().to_vec()),
            Some(Val::UnixTimestampVal(v)) => (Scalar::UnixTimestamp, v.to_le_bytes().to_vec()),
            other => {
                return Err(Error::input(format!(
                    "join key {name:?}: Feast cannot serialize an entity value of kind {}",
                    other.as_ref().map_or(0, Val::tag)
                )));
            }
        };
        push_entity_value(&mut out, kind, &bytes)?;
    }
    Ok(out)
}

/// The start of Feast's entity-key encoding (version 3): the key count and the join-key names,
/// which must already be sorted by name. It is the same for every row of a feature view, so the
/// Arrow path builds it once and appends each row's values with `push_entity_value`.
pub fn entity_key_header(sorted_names: &[&str]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(16 + 24 * sorted_names.len());
    push_u32(&mut out, sorted_names.len())?;
    for name in sorted_names {
        push_u32(&mut out, Scalar::String as usize)?;
        push_u32(&mut out, name.len())?;
        out.extend_from_slice(name.as_bytes());
    }
    Ok(out)
}

/// Appends one join-key value (in the header's name order) to an entity key.
pub fn push_entity_value(out: &mut Vec<u8>, kind: Scalar, bytes: &[u8]) -> Result<()> {
    push_u32(out, kind as usize)?;
    push_u32(out, bytes.len())?;
    out.extend_from_slice(bytes);
    Ok(())
}

/// Reads the little-endian words and byte strings of Feast's entity-key encoding.
struct KeyReader<'a> {
    bytes: &'a [u8],
}

impl<'a> KeyReader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.bytes.split_at_checked(n)?;
        self.bytes = rest;
        Some(head)
    }

    fn word(&mut self) -> Option<usize> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize)
    }

    /// A (type, bytes) part.
    fn part(&mut self) -> Option<(usize, &'a [u8])> {
        let kind = self.word()?;
        let len = self.word()?;
        Some((kind, self.take(len)?))
    }
}

fn entity_value(kind: usize, raw: &[u8]) -> Option<Val> {
    let le8 = || raw.try_into().ok().map(i64::from_le_bytes);
    Some(match kind {
        k if k == Scalar::String as usize => Val::StringVal(String::from_utf8(raw.to_vec()).ok()?),
        k if k == Scalar::Bytes as usize => Val::BytesVal(raw.to_vec()),
        k if k == Scalar::Int32 as usize => Val::Int32Val(i32::from_le_bytes(raw.try_into().ok()?)),
        k if k == Scalar::Int64 as usize => Val::Int64Val(le8()?),
        k if k == Scalar::UnixTimestamp as usize => Val::UnixTimestampVal(le8()?),
        _ => return None,
    })
}

/// The inverse of `serialize_entity_key`: Feast's serialized key (version 3) back to an
/// `EntityKey` (join keys in Feast's sorted order). Migration needs it: the contrib store kept
/// only the serialized key, not the join-key values.
pub fn deserialize_entity_key(bytes: &[u8]) -> Result<EntityKey> {
    let parse = || -> Option<EntityKey> {
        let mut r = KeyReader { bytes };
        let count = r.word()?;
        // The count comes from the input: each key takes at least 16 bytes, so a count the
        // bytes cannot hold is rejected before it sizes an allocation.
        if count > bytes.len() / 16 {
            return None;
        }
        let mut join_keys = Vec::with_capacity(count);
        for _ in 0..count {
            let (_, name) = r.part()?;
            join_keys.push(String::from_utf8(name.to_vec()).ok()?);
        }
        let mut entity_values = Vec::with_capacity(count);
        for _ in 0..count {
            let (kind, raw) = r.part()?;
            entity_values.push(Value {
                val: Some(entity_value(kind, raw)?),
            });
        }
        r.bytes.is_empty().then_some(EntityKey {
            join_keys,
            entity_values,
        })
    };
    parse().ok_or_else(|| Error::input("not a Feast serialized entity key (version 3)"))
}

fn push_u32(out: &mut Vec<u8>, n: usize) -> Result<()> {
    let n = u32::try_from(n).map_err(|_| Error::input("entity key part is larger than 4 GiB"))?;
    out.extend_from_slice(&n.to_le_bytes());
    Ok(())
}

pub fn decode_entity_key(bytes: &[u8]) -> Result<EntityKey> {
    EntityKey::decode(bytes).map_err(|e| Error::input(format!("not an EntityKey proto: {e}")))
}

pub fn decode_value(bytes: &[u8]) -> Result<Value> {
    Value::decode(bytes).map_err(|e| Error::input(format!("not a Value proto: {e}")))
}

/// Serialized Feast keys for serialized `EntityKey` protos.
pub fn serialize_entity_keys(protos: &[&[u8]]) -> Result<Vec<Vec<u8>>> {
    protos
        .iter()
        .map(|p| serialize_entity_key(&decode_entity_key(p)?))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Values -> Arrow

fn kind_name(tag: u32) -> String {
    format!("Value field #{tag}")
}

/// Decodes the values of one typed column, checking each has the column's kind. Unset values and
/// `null_val` become nulls.
fn decode_typed(col: &Column, expected: u32, cells: &[&[u8]]) -> Result<Vec<Option<Val>>> {
    cells
        .iter()
        .map(|bytes| match proto::value_tag(bytes) {
            None | Some(NULL_TAG) => Ok(None),
            Some(tag) if tag == expected => Value::decode(*bytes)
                .map(|v| v.val)
                .map_err(|e| Error::input(format!("feature {:?}: bad Value proto: {e}", col.name))),
            Some(tag) => Err(Error::input(format!(
                "feature {:?} is declared as Feast ValueType {} but a row holds {} \
                 (expected field #{expected})",
                col.name,
                col.value_type,
                kind_name(tag)
            ))),
        })
        .collect()
}

macro_rules! scalar_array {
    ($vals:expr, $builder:expr, $ty:expr, $variant:path, $conv:expr) => {{
        let mut b = $builder;
        for v in $vals {
            match v {
                Some($variant(x)) => b.append_value($conv(x)?),
                _ => b.append_null(),
            }
        }
        Arc::new(b.finish()) as ArrayRef
    }};
}

macro_rules! list_array {
    ($vals:expr, $field:expr, $inner:expr, [$($variant:path),+], $conv:expr) => {{
        let mut b = ListBuilder::new($inner).with_field($field.clone());
        for v in $vals {
            match v {
                $(Some($variant(list)))|+ => {
                    for x in list.val {
                        b.values().append_value($conv(x)?);
                    }
                    b.append(true);
                }
                _ => b.append_null(),
            }
        }
        Arc::new(b.finish()) as ArrayRef
    }};
}

fn ok<T>(x: T) -> Result<T> {
    Ok(x)
}

fn scalar_column(s: Scalar, dt: &DataType, vals: Vec<Option<Val>>, name: &str) -> Result<ArrayRef> {
    let n = vals.len();
    let ts = |x: i64| seconds_to_micros(x, name);
    Ok(match s {
        Scalar::Bytes => scalar_array!(vals, LargeBinaryBuilder::new(), dt, Val::BytesVal, ok),
        Scalar::String => scalar_array!(vals, StringBuilder::new(), dt, Val::StringVal, ok),
        Scalar::Int32 => scalar_array!(vals, Int32Builder::with_capacity(n), dt, Val::Int32Val, ok),
        Scalar::Int64 => scalar_array!(vals, Int64Builder::with_capacity(n), dt, Val::Int64Val, ok),
        Scalar::Double => {
            scalar_array!(
                vals,
                Float64Builder::with_capacity(n),
                dt,
                Val::DoubleVal,
                ok
            )
        }
        Scalar::Float => scalar_array!(
            vals,
            Float32Builder::with_capacity(n),
            dt,
            Val::FloatVal,
            ok
        ),
        Scalar::Bool => scalar_array!(vals, BooleanBuilder::with_capacity(n), dt, Val::BoolVal, ok),
        Scalar::UnixTimestamp => scalar_array!(
            vals,
            TimestampMicrosecondBuilder::with_capacity(n).with_data_type(dt.clone()),
            dt,
            Val::UnixTimestampVal,
            ts
        ),
    })
}

fn list_column(s: Scalar, dt: &DataType, vals: Vec<Option<Val>>, name: &str) -> Result<ArrayRef> {
    let DataType::List(field) = dt else {
        return Err(Error::internal(format!(
            "column {name:?} is not an Arrow list"
        )));
    };
    let field: &FieldRef = field;
    let ts = |x: i64| seconds_to_micros(x, name);
    Ok(match s {
        Scalar::Bytes => list_array!(
            vals,
            field,
            LargeBinaryBuilder::new(),
            [Val::BytesListVal, Val::BytesSetVal],
            ok
        ),
        Scalar::String => list_array!(
            vals,
            field,
            StringBuilder::new(),
            [Val::StringListVal, Val::StringSetVal],
            ok
        ),
        Scalar::Int32 => list_array!(
            vals,
            field,
            Int32Builder::new(),
            [Val::Int32ListVal, Val::Int32SetVal],
            ok
        ),
        Scalar::Int64 => list_array!(
            vals,
            field,
            Int64Builder::new(),
            [Val::Int64ListVal, Val::Int64SetVal],
            ok
        ),
        Scalar::Double => list_array!(
            vals,
            field,
            Float64Builder::new(),
            [Val::DoubleListVal, Val::DoubleSetVal],
            ok
        ),
        Scalar::Float => list_array!(
            vals,
            field,
            Float32Builder::new(),
            [Val::FloatListVal, Val::FloatSetVal],
            ok
        ),
        Scalar::Bool => list_array!(
            vals,
            field,
            BooleanBuilder::new(),
            [Val::BoolListVal, Val::BoolSetVal],
            ok
        ),
        Scalar::UnixTimestamp => list_array!(
            vals,
            field,
            TimestampMicrosecondBuilder::new().with_data_type(field.data_type().clone()),
            [Val::UnixTimestampListVal, Val::UnixTimestampSetVal],
            ts
        ),
    })
}

/// The payload of a serialized `Value` that is one field and nothing more, by wire type.
enum Lone<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
}

/// Reads `bytes` as exactly one field numbered `expected` (the shape every Feast client writes
/// for a scalar), or None for anything else: another kind, `null_val`, repeated or unknown
/// fields, a varint prost would reject. None sends the column to `decode_typed`, which gives
/// those cases their exact meaning and errors.
fn lone_field(bytes: &[u8], expected: u32) -> Option<Lone<'_>> {
    let (key, n) = proto::read_varint(bytes)?;
    if key >> 3 != u64::from(expected) {
        return None;
    }
    let rest = &bytes[n..];
    let (value, used) = match key & 7 {
        0 => {
            let (v, used) = proto::read_varint(rest)?;
            // prost rejects a 10-byte varint whose last byte has more than one bit.
            (used < 10 || rest[9] <= 1).then_some((Lone::Varint(v), used))?
        }
        1 => (
            Lone::Fixed64(u64::from_le_bytes(rest.get(..8)?.try_into().ok()?)),
            8,
        ),
        5 => (
            Lone::Fixed32(u32::from_le_bytes(rest.get(..4)?.try_into().ok()?)),
            4,
        ),
        2 => {
            let (len, used) = proto::read_varint(rest)?;
            let end = used.checked_add(usize::try_from(len).ok()?)?;
            (Lone::Bytes(rest.get(used..end)?), end)
        }
        _ => return None,
    };
    (used == rest.len()).then_some(value)
}

macro_rules! lone_array {
    ($cells:expr, $expected:expr, $builder:expr, $lone:pat => $value:expr) => {{
        let mut b = $builder;
        for cell in $cells {
            if cell.is_empty() {
                b.append_null();
                continue;
            }
            match lone_field(cell, $expected) {
                Some($lone) => b.append_value($value),
                _ => return Ok(None),
            }
        }
        Arc::new(b.finish()) as ArrayRef
    }};
}

/// A scalar column built straight from the wire bytes when every cell is unset or a lone field
/// of the column's kind: no `Val` per cell, no `String` per string. Ok(None) when some cell is
/// not that simple; the caller then decodes the column in full.
fn lone_scalar_column(
    s: Scalar,
    dt: &DataType,
    cells: &[&[u8]],
    name: &str,
) -> Result<Option<ArrayRef>> {
    let n = cells.len();
    let tag = s as u32;
    // The conversions are prost's: int32 truncates the varint, bool compares it with zero.
    let array = match s {
        Scalar::Bytes => lone_array!(cells, tag, LargeBinaryBuilder::new(), Lone::Bytes(x) => x),
        Scalar::String => lone_array!(cells, tag, StringBuilder::new(), Lone::Bytes(x) => {
            let Ok(text) = std::str::from_utf8(x) else { return Ok(None) };
            text
        }),
        Scalar::Int32 => {
            lone_array!(cells, tag, Int32Builder::with_capacity(n), Lone::Varint(v) => v as i32)
        }
        Scalar::Int64 => {
            lone_array!(cells, tag, Int64Builder::with_capacity(n), Lone::Varint(v) => v as i64)
        }
        Scalar::Double => {
            lone_array!(cells, tag, Float64Builder::with_capacity(n), Lone::Fixed64(v) => f64::from_bits(v))
        }
        Scalar::Float => {
            lone_array!(cells, tag, Float32Builder::with_capacity(n), Lone::Fixed32(v) => f32::from_bits(v))
        }
        Scalar::Bool => {
            lone_array!(cells, tag, BooleanBuilder::with_capacity(n), Lone::Varint(v) => v != 0)
        }
        Scalar::UnixTimestamp => lone_array!(
            cells,
            tag,
            TimestampMicrosecondBuilder::with_capacity(n).with_data_type(dt.clone()),
            Lone::Varint(v) => seconds_to_micros(v as i64, name)?
        ),
    };
    Ok(Some(array))
}

/// The serialized protos as-is; unset values and explicit `null_val`s are nulls, as in typed
/// columns, so SQL engines see NULL and reads return an unset `Value`.
fn proto_column(cells: &[&[u8]]) -> ArrayRef {
    let mut b = LargeBinaryBuilder::new();
    for c in cells {
        if matches!(proto::value_tag(c), None | Some(NULL_TAG)) {
            b.append_null();
        } else {
            b.append_value(c);
        }
    }
    Arc::new(b.finish())
}

/// One Arrow column from the serialized `Value`s of one feature or join key.
pub fn values_to_array(col: &Column, dt: &DataType, cells: &[&[u8]]) -> Result<ArrayRef> {
    let Some(expected) = col.kind.value_tag() else {
        return Ok(proto_column(cells));
    };
    if let ColumnKind::Scalar(s) = col.kind
        && let Some(array) = lone_scalar_column(s, dt, cells, &col.name)?
    {
        return Ok(array);
    }
    let vals = decode_typed(col, expected, cells)?;
    match col.kind {
        ColumnKind::Scalar(s) => scalar_column(s, dt, vals, &col.name),
        ColumnKind::List(s) | ColumnKind::Set(s) => list_column(s, dt, vals, &col.name),
        ColumnKind::Proto => Ok(proto_column(cells)),
    }
}

/// A write batch in the table's Arrow schema.
pub struct WriteInput<'a> {
    pub feature_names: &'a [String],
    pub entity_keys: &'a [&'a [u8]],
    /// Row-major: row i holds `values[i*F..(i+1)*F]`.
    pub values: &'a [&'a [u8]],
    pub event_ts: &'a [i64],
    pub created_ts: &'a [Option<i64>],
}

/// The typed join-key columns of `keys`: (position in the table schema, values).
pub fn join_key_columns(layout: &Layout, keys: &[EntityKey]) -> Result<Vec<(usize, ArrayRef)>> {
    layout
        .join_keys
        .iter()
        .map(|col| {
            let cells: Vec<Vec<u8>> = keys
                .iter()
                .map(|k| {
                    k.join_keys
                        .iter()
                        .position(|n| *n == col.name)
                        .map(|i| k.entity_values[i].encode_to_vec())
                        .unwrap_or_default()
                })
                .collect();
            let refs: Vec<&[u8]> = cells.iter().map(Vec::as_slice).collect();
            let dt = layout.arrow.field(col.index).data_type();
            Ok((col.index, values_to_array(col, dt, &refs)?))
        })
        .collect()
}

/// Validates a batch and converts it to one `RecordBatch` in the table schema, before any I/O.
pub fn build_write_batch(layout: &Layout, input: &WriteInput<'_>) -> Result<RecordBatch> {
    let rows = input.entity_keys.len();
    let width = input.feature_names.len();
    if input.values.len() != rows * width
        || input.event_ts.len() != rows
        || input.created_ts.len() != rows
    {
        return Err(Error::input(format!(
            "batch is ragged: {rows} keys, {} values for {width} features, {} event and {} \
             created timestamps",
            input.values.len(),
            input.event_ts.len(),
            input.created_ts.len()
        )));
    }
    let mut feature_pos = Vec::with_capacity(width);
    for name in input.feature_names {
        let col = layout.feature(name).ok_or_else(|| {
            Error::schema(format!(
                "feature {name:?} is not a column of the table (run `feast apply` after adding \
                 features)"
            ))
        })?;
        feature_pos.push(col.index);
    }

    let keys: Vec<EntityKey> = input
        .entity_keys
        .iter()
        .map(|b| decode_entity_key(b))
        .collect::<Result<_>>()?;
    let mut columns: Vec<Option<ArrayRef>> = vec![None; layout.arrow.fields().len()];

    let mut serialized = LargeBinaryBuilder::with_capacity(rows, rows * 24);
    for k in &keys {
        serialized.append_value(serialize_entity_key(k)?);
    }
    columns[layout.entity_key] = Some(Arc::new(serialized.finish()));

    for (index, array) in join_key_columns(layout, &keys)? {
        columns[index] = Some(array);
    }

    let ts_type = layout.arrow.field(layout.event_ts).data_type().clone();
    let mut ev = TimestampMicrosecondBuilder::with_capacity(rows).with_data_type(ts_type.clone());
    ev.append_slice(input.event_ts);
    columns[layout.event_ts] = Some(Arc::new(ev.finish()));
    let mut cr = TimestampMicrosecondBuilder::with_capacity(rows).with_data_type(ts_type);
    for c in input.created_ts {
        cr.append_option(*c);
    }
    columns[layout.created_ts] = Some(Arc::new(cr.finish()));

    let mut cells: Vec<&[u8]> = Vec::with_capacity(rows);
    for (j, &index) in feature_pos.iter().enumerate() {
        cells.clear();
        cells.extend((0..rows).map(|i| input.values[i * width + j]));
        let col = layout
            .features
            .iter()
            .find(|c| c.index == index)
            .ok_or_else(|| Error::internal("feature column vanished"))?;
        let dt = layout.arrow.field(index).data_type();
        columns[index] = Some(values_to_array(col, dt, &cells)?);
    }

    table_batch(layout, columns, rows)
}

/// One batch in the table schema from its columns by schema position; a column the writer did
/// not provide (a feature dropped from the view, still in the table) is all nulls.
pub fn table_batch(
    layout: &Layout,
    columns: Vec<Option<ArrayRef>>,
    rows: usize,
) -> Result<RecordBatch> {
    let columns: Vec<ArrayRef> = columns
        .into_iter()
        .zip(layout.arrow.fields())
        .map(|(c, f)| c.unwrap_or_else(|| new_null_array(f.data_type(), rows)))
        .collect();
    Ok(RecordBatch::try_new(layout.arrow.clone(), columns)?)
}

// ---------------------------------------------------------------------------------------------
// Arrow -> Values

fn encode(val: Val) -> Vec<u8> {
    Value { val: Some(val) }.encode_to_vec()
}

macro_rules! list_values {
    ($list:expr, $ty:ty, $msg:ident, $conv:expr) => {{
        let arr = $list.as_primitive::<$ty>();
        proto::$msg {
            val: arr.values().iter().map(|x| $conv(*x)).collect(),
        }
    }};
}

/// One stored scalar, wherever it was decoded from (an Arrow array or a page read in place).
#[derive(Debug, Clone, Copy)]
pub enum ScalarRef<'a> {
    Bytes(&'a [u8]),
    Int32(i32),
    Int64(i64),
    Float(f32),
    Double(f64),
    Bool(bool),
}

/// The `Val` of a stored scalar of Feast kind `s` (None if the stored type does not fit it).
fn scalar_val(s: Scalar, v: ScalarRef<'_>) -> Option<Val> {
    Some(match (s, v) {
        (Scalar::Bytes, ScalarRef::Bytes(b)) => Val::BytesVal(b.to_vec()),
        (Scalar::String, ScalarRef::Bytes(b)) => {
            Val::StringVal(String::from_utf8_lossy(b).into_owned())
        }
        (Scalar::Int32, ScalarRef::Int32(x)) => Val::Int32Val(x),
        (Scalar::Int64, ScalarRef::Int64(x)) => Val::Int64Val(x),
        (Scalar::Double, ScalarRef::Double(x)) => Val::DoubleVal(x),
        (Scalar::Float, ScalarRef::Float(x)) => Val::FloatVal(x),
        (Scalar::Bool, ScalarRef::Bool(x)) => Val::BoolVal(x),
        (Scalar::UnixTimestamp, ScalarRef::Int64(micros)) => {
            Val::UnixTimestampVal(micros_to_seconds(micros))
        }
        _ => return None,
    })
}

/// The serialized `Value` of a stored scalar of Feast kind `s`.
pub fn scalar_value(s: Scalar, v: ScalarRef<'_>) -> Vec<u8> {
    scalar_val(s, v).map(encode).unwrap_or_default()
}

fn scalar_ref(s: Scalar, array: &dyn Array, row: usize) -> ScalarRef<'_> {
    match s {
        Scalar::Bytes => ScalarRef::Bytes(array.as_binary::<i64>().value(row)),
        Scalar::String => ScalarRef::Bytes(array.as_string::<i32>().value(row).as_bytes()),
        Scalar::Int32 => ScalarRef::Int32(array.as_primitive::<Int32Type>().value(row)),
        Scalar::Int64 => ScalarRef::Int64(array.as_primitive::<Int64Type>().value(row)),
        Scalar::Double => ScalarRef::Double(array.as_primitive::<Float64Type>().value(row)),
        Scalar::Float => ScalarRef::Float(array.as_primitive::<Float32Type>().value(row)),
        Scalar::Bool => ScalarRef::Bool(array.as_boolean().value(row)),
        Scalar::UnixTimestamp => {
            ScalarRef::Int64(array.as_primitive::<TimestampMicrosecondType>().value(row))
        }
    }
}

fn list_cell(s: Scalar, set: bool, items: &dyn Array) -> Val {
    match (s, set) {
        (Scalar::Bytes, _) => {
            let v = proto::BytesList {
                val: items
                    .as_binary::<i64>()
                    .iter()
                    .flatten()
                    .map(<[u8]>::to_vec)
                    .collect(),
            };
            if set {
                Val::BytesSetVal(v)
            } else {
                Val::BytesListVal(v)
            }
        }
        (Scalar::String, _) => {
            let v = proto::StringList {
                val: items
                    .as_string::<i32>()
                    .iter()
                    .flatten()
                    .map(str::to_string)
                    .collect(),
            };
            if set {
                Val::StringSetVal(v)
            } else {
                Val::StringListVal(v)
            }
        }
        (Scalar::Bool, _) => {
            let v = proto::BoolList {
                val: items.as_boolean().iter().flatten().collect(),
            };
            if set {
                Val::BoolSetVal(v)
            } else {
                Val::BoolListVal(v)
            }
        }
        (Scalar::Int32, false) => Val::Int32ListVal(list_values!(
            items,
            Int32Type,
            Int32List,
            std::convert::identity
        )),
        (Scalar::Int32, true) => Val::Int32SetVal(list_values!(
            items,
            Int32Type,
            Int32List,
            std::convert::identity
        )),
        (Scalar::Int64, false) => Val::Int64ListVal(list_values!(
            items,
            Int64Type,
            Int64List,
            std::convert::identity
        )),
        (Scalar::Int64, true) => Val::Int64SetVal(list_values!(
            items,
            Int64Type,
            Int64List,
            std::convert::identity
        )),
        (Scalar::Double, false) => Val::DoubleListVal(list_values!(
            items,
            Float64Type,
            DoubleList,
            std::convert::identity
        )),
        (Scalar::Double, true) => Val::DoubleSetVal(list_values!(
            items,
            Float64Type,
            DoubleList,
            std::convert::identity
        )),
        (Scalar::Float, false) => Val::FloatListVal(list_values!(
            items,
            Float32Type,
            FloatList,
            std::convert::identity
        )),
        (Scalar::Float, true) => Val::FloatSetVal(list_values!(
            items,
            Float32Type,
            FloatList,
            std::convert::identity
        )),
        (Scalar::UnixTimestamp, false) => Val::UnixTimestampListVal(list_values!(
            items,
            TimestampMicrosecondType,
            Int64List,
            micros_to_seconds
        )),
        (Scalar::UnixTimestamp, true) => Val::UnixTimestampSetVal(list_values!(
            items,
            TimestampMicrosecondType,
            Int64List,
            micros_to_seconds
        )),
    }
}

/// The serialized `Value` of one cell; a null cell is an unset `Value` (empty bytes).
pub fn cell_to_value(kind: ColumnKind, array: &dyn Array, row: usize) -> Vec<u8> {
    if array.is_null(row) {
        return Vec::new();
    }
    match kind {
        ColumnKind::Proto => array.as_binary::<i64>().value(row).to_vec(),
        ColumnKind::Scalar(s) => scalar_value(s, scalar_ref(s, array, row)),
        ColumnKind::List(s) => encode(list_cell(s, false, &array.as_list::<i32>().value(row))),
        ColumnKind::Set(s) => encode(list_cell(s, true, &array.as_list::<i32>().value(row))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pairs: &[(&str, Val)]) -> EntityKey {
        EntityKey {
            join_keys: pairs.iter().map(|p| p.0.to_string()).collect(),
            entity_values: pairs
                .iter()
                .map(|p| Value {
                    val: Some(p.1.clone()),
                })
                .collect(),
        }
    }

    #[test]
    fn entity_key_matches_feast_layout() {
        // Feast v3: count, then (type=STRING, len, name) per key, then (type, len, bytes).
        let k = serialize_entity_key(&key(&[("driver_id", Val::Int64Val(1001))])).unwrap();
        let mut expect = vec![1, 0, 0, 0, 2, 0, 0, 0, 9, 0, 0, 0];
        expect.extend_from_slice(b"driver_id");
        expect.extend_from_slice(&[4, 0, 0, 0, 8, 0, 0, 0]);
        expect.extend_from_slice(&1001i64.to_le_bytes());
        assert_eq!(k, expect);
    }

    #[test]
    fn compound_keys_are_sorted_by_name() {
        let a = serialize_entity_key(&key(&[
            ("b", Val::StringVal("x".into())),
            ("a", Val::Int32Val(-3)),
        ]))
        .unwrap();
        let b = serialize_entity_key(&key(&[
            ("a", Val::Int32Val(-3)),
            ("b", Val::StringVal("x".into())),
        ]))
        .unwrap();
        assert_eq!(a, b);
        assert!(serialize_entity_key(&key(&[("a", Val::DoubleVal(1.0))])).is_err());
    }

    #[test]
    fn deserialize_inverts_serialize() {
        let k = key(&[
            ("zone", Val::StringVal("eu".into())),
            ("id", Val::Int64Val(-7)),
            ("n", Val::Int32Val(3)),
            ("blob", Val::BytesVal(vec![0, 255])),
            ("at", Val::UnixTimestampVal(1_767_225_600)),
        ]);
        let bytes = serialize_entity_key(&k).unwrap();
        let back = deserialize_entity_key(&bytes).unwrap();
        assert_eq!(serialize_entity_key(&back).unwrap(), bytes);
        assert_eq!(back.join_keys, vec!["at", "blob", "id", "n", "zone"]);
        assert!(deserialize_entity_key(&bytes[..bytes.len() - 1]).is_err());
        assert!(deserialize_entity_key(b"garbage").is_err());
    }

    #[test]
    fn lone_fields_build_the_same_columns_as_full_decoding() {
        use arrow_schema::TimeUnit;
        let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into()));
        let cases = [
            (
                Scalar::Bytes,
                DataType::LargeBinary,
                vec![Val::BytesVal(vec![]), Val::BytesVal(vec![0, 255])],
            ),
            (
                Scalar::String,
                DataType::Utf8,
                vec![Val::StringVal(String::new()), Val::StringVal("é x".into())],
            ),
            (
                Scalar::Int32,
                DataType::Int32,
                vec![Val::Int32Val(-1), Val::Int32Val(i32::MAX), Val::Int32Val(0)],
            ),
            (
                Scalar::Int64,
                DataType::Int64,
                vec![Val::Int64Val(i64::MIN), Val::Int64Val(300)],
            ),
            (
                Scalar::Double,
                DataType::Float64,
                vec![Val::DoubleVal(-0.5), Val::DoubleVal(f64::MAX)],
            ),
            (
                Scalar::Float,
                DataType::Float32,
                vec![Val::FloatVal(1.25), Val::FloatVal(f32::MIN)],
            ),
            (
                Scalar::Bool,
                DataType::Boolean,
                vec![Val::BoolVal(true), Val::BoolVal(false)],
            ),
            (
                Scalar::UnixTimestamp,
                ts,
                vec![
                    Val::UnixTimestampVal(NAN_TIMESTAMP),
                    Val::UnixTimestampVal(-5),
                ],
            ),
        ];
        for (s, dt, vals) in cases {
            let col = Column {
                name: "c".into(),
                value_type: s as i32,
                kind: ColumnKind::Scalar(s),
                index: 0,
            };
            let mut cells: Vec<Vec<u8>> = vals.into_iter().map(encode).collect();
            cells.push(Vec::new()); // unset
            let refs: Vec<&[u8]> = cells.iter().map(Vec::as_slice).collect();
            let lone = lone_scalar_column(s, &dt, &refs, "c")
                .unwrap()
                .expect("lone fields");
            let full = decode_typed(&col, s as u32, &refs).unwrap();
            let full = scalar_column(s, &dt, full, "c").unwrap();
            assert_eq!(lone.to_data(), full.to_data(), "{s:?}");
        }
    }

    #[test]
    fn anything_but_a_lone_field_goes_to_full_decoding() {
        let int32 = encode(Val::Int32Val(5));
        let twice = [int32.clone(), int32.clone()].concat();
        let unknown_after = [int32.clone(), vec![0xF8, 0x01, 0x00]].concat();
        let overlong = [vec![0x18], vec![0xFF; 9], vec![0x02]].concat();
        for cell in [
            encode(Val::NullVal(0)),
            encode(Val::Int64Val(5)),
            twice,
            unknown_after,
            overlong,
            int32[..1].to_vec(),
        ] {
            let refs = [int32.as_slice(), cell.as_slice()];
            assert!(
                lone_scalar_column(Scalar::Int32, &DataType::Int32, &refs, "c")
                    .unwrap()
                    .is_none()
            );
        }
        let bad_utf8 = [vec![0x12, 0x01], vec![0xFF]].concat();
        let wrong_wire = vec![0x28, 0x01]; // field 5 (double) as a varint
        let short_double = vec![0x29, 0, 0, 0];
        assert!(lone_field(&bad_utf8, 2).is_some());
        for (s, dt, cell) in [
            (Scalar::String, DataType::Utf8, bad_utf8),
            (Scalar::Double, DataType::Float64, wrong_wire),
            (Scalar::Double, DataType::Float64, short_double),
        ] {
            assert!(
                lone_scalar_column(s, &dt, &[cell.as_slice()], "c")
                    .unwrap()
                    .is_none()
            );
        }
    }

    #[test]
    fn timestamps_keep_the_nan_sentinel() {
        assert_eq!(
            seconds_to_micros(NAN_TIMESTAMP, "c").unwrap(),
            NAN_TIMESTAMP
        );
        assert_eq!(micros_to_seconds(seconds_to_micros(-5, "c").unwrap()), -5);
        assert!(seconds_to_micros(i64::MAX / 10, "c").is_err());
    }
}
