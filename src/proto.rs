//! Feast's `Value` and `EntityKey` protobuf messages (feast/protos/feast/types/*.proto), declared
//! with prost derives so no protoc is needed at build time. Only the fields we store typed are
//! spelled out; every other `Value` kind is kept as its serialized bytes, so unknown or future
//! kinds round-trip untouched.

use prost::Message;

#[derive(Clone, PartialEq, Message)]
pub struct EntityKey {
    #[prost(string, repeated, tag = "1")]
    pub join_keys: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    pub entity_values: Vec<Value>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Value {
    #[prost(
        oneof = "value::Val",
        tags = "1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 14, 15, 16, 17, 18, 19, 22, 23, 24, 25, 26, 27, 28, 29"
    )]
    pub val: Option<value::Val>,
}

macro_rules! repeated_message {
    ($($name:ident: $kind:ident $ty:ty),* $(,)?) => {$(
        #[derive(Clone, PartialEq, Message)]
        pub struct $name {
            #[prost($kind, repeated, tag = "1")]
            pub val: Vec<$ty>,
        }
    )*};
}

repeated_message! {
    BytesList: bytes Vec<u8>,
    StringList: string String,
    Int32List: int32 i32,
    Int64List: int64 i64,
    DoubleList: double f64,
    FloatList: float f32,
    BoolList: bool bool,
}

pub mod value {
    use super::{BoolList, BytesList, DoubleList, FloatList, Int32List, Int64List, StringList};

    /// The `val` oneof. Field numbers equal Feast's `ValueType` numbers for every kind listed
    /// (scalars 1-8, lists 11-18, sets 22-29); sets reuse the list messages because their wire
    /// format is identical (`repeated <scalar> val = 1`).
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Val {
        #[prost(bytes, tag = "1")]
        BytesVal(Vec<u8>),
        #[prost(string, tag = "2")]
        StringVal(String),
        #[prost(int32, tag = "3")]
        Int32Val(i32),
        #[prost(int64, tag = "4")]
        Int64Val(i64),
        #[prost(double, tag = "5")]
        DoubleVal(f64),
        #[prost(float, tag = "6")]
        FloatVal(f32),
        #[prost(bool, tag = "7")]
        BoolVal(bool),
        #[prost(int64, tag = "8")]
        UnixTimestampVal(i64),
        #[prost(message, tag = "11")]
        BytesListVal(BytesList),
        #[prost(message, tag = "12")]
        StringListVal(StringList),
        #[prost(message, tag = "13")]
        Int32ListVal(Int32List),
        #[prost(message, tag = "14")]
        Int64ListVal(Int64List),
        #[prost(message, tag = "15")]
        DoubleListVal(DoubleList),
        #[prost(message, tag = "16")]
        FloatListVal(FloatList),
        #[prost(message, tag = "17")]
        BoolListVal(BoolList),
        #[prost(message, tag = "18")]
        UnixTimestampListVal(Int64List),
        #[prost(enumeration = "i32", tag = "19")]
        NullVal(i32),
        #[prost(message, tag = "22")]
        BytesSetVal(BytesList),
        #[prost(message, tag = "23")]
        StringSetVal(StringList),
        #[prost(message, tag = "24")]
        Int32SetVal(Int32List),
        #[prost(message, tag = "25")]
        Int64SetVal(Int64List),
        #[prost(message, tag = "26")]
        DoubleSetVal(DoubleList),
        #[prost(message, tag = "27")]
        FloatSetVal(FloatList),
        #[prost(message, tag = "28")]
        BoolSetVal(BoolList),
        #[prost(message, tag = "29")]
        UnixTimestampSetVal(Int64List),
    }

    impl Val {
        /// The oneof field number, which is also the Feast `ValueType` of the kind.
        pub fn tag(&self) -> u32 {
            match self {
                Self::BytesVal(_) => 1,
                Self::StringVal(_) => 2,
                Self::Int32Val(_) => 3,
                Self::Int64Val(_) => 4,
                Self::DoubleVal(_) => 5,
                Self::FloatVal(_) => 6,
                Self::BoolVal(_) => 7,
                Self::UnixTimestampVal(_) => 8,
                Self::BytesListVal(_) => 11,
                Self::StringListVal(_) => 12,
                Self::Int32ListVal(_) => 13,
                Self::Int64ListVal(_) => 14,
                Self::DoubleListVal(_) => 15,
                Self::FloatListVal(_) => 16,
                Self::BoolListVal(_) => 17,
                Self::UnixTimestampListVal(_) => 18,
                Self::NullVal(_) => 19,
                Self::BytesSetVal(_) => 22,
                Self::StringSetVal(_) => 23,
                Self::Int32SetVal(_) => 24,
                Self::Int64SetVal(_) => 25,
                Self::DoubleSetVal(_) => 26,
                Self::FloatSetVal(_) => 27,
                Self::BoolSetVal(_) => 28,
                Self::UnixTimestampSetVal(_) => 29,
            }
        }
    }
}

/// Appends one `Value` (serialized) to a serialized `RepeatedValue { repeated Value val = 1 }`.
pub fn push_repeated_value_item(out: &mut Vec<u8>, value: &[u8]) {
    push_len_field(out, 1, value);
}

/// Appends a length-delimited field (a message, bytes, a packed repeated scalar).
pub fn push_len_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    push_varint(out, u64::from(field << 3 | 2));
    push_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Appends a varint field; proto3 leaves a zero out, so callers need not check.
pub fn push_varint_field(out: &mut Vec<u8>, field: u32, value: u64) {
    if value != 0 {
        push_varint(out, u64::from(field << 3));
        push_varint(out, value);
    }
}

/// A base-128 varint (negative int64/int32 values go in as their 64-bit two's complement).
pub fn push_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// The oneof field number set in a serialized `Value`, or None when unset. Reads only the first
/// key, so kinds prost does not model (maps, json, ...) are recognised without decoding them.
pub fn value_tag(bytes: &[u8]) -> Option<u32> {
    if bytes.is_empty() {
        return None;
    }
    let (key, _) = read_varint(bytes)?;
    u32::try_from(key >> 3).ok()
}

/// A base-128 varint at the start of `bytes` and the bytes it took (at most 10).
pub fn read_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut out = 0u64;
    for (i, b) in bytes.iter().take(10).enumerate() {
        out |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((out, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, PartialEq, Message)]
    struct RepeatedValue {
        #[prost(message, repeated, tag = "1")]
        val: Vec<Value>,
    }

    #[test]
    fn repeated_value_items_decode_as_feasts_message() {
        let values = vec![
            Value {
                val: Some(value::Val::StringVal("x".repeat(200))),
            },
            Value::default(),
            Value {
                val: Some(value::Val::Int64Val(-5)),
            },
        ];
        let mut out = Vec::new();
        for v in &values {
            push_repeated_value_item(&mut out, &v.encode_to_vec());
        }
        assert_eq!(RepeatedValue::decode(&out[..]).unwrap().val, values);
    }
}
