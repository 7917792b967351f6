//! Feast value types <-> Iceberg/Arrow types, and the layout of one of our tables.
//!
//! Types with an exact Iceberg twin get a typed column (so SQL engines can filter and aggregate);
//! every other Feast kind (maps, json, structs, uuids, decimals, ...) is stored as the serialized
//! `Value` proto in a binary column, which round-trips exactly. The Feast `ValueType` of every
//! column lives in the table properties, so reads need nothing but the table metadata.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow_schema::SchemaRef;
use iceberg::spec::{
    ListType, NestedField, NestedFieldRef, PrimitiveType, Schema, TableMetadata, Transform, Type,
    UnboundPartitionSpec,
};

use crate::error::{Error, Result};

pub const ENTITY_KEY: &str = "entity_key";
pub const EVENT_TS: &str = "event_ts";
pub const CREATED_TS: &str = "created_ts";

/// Rows per row group of our data files (one page per column): a point read that misses the
/// cache fetches and decodes one row group, so it is sized to stay under 64 KiB for a typical
/// feature row (10 features: ~100 bytes a row compressed), one contiguous range of the file:
/// one ranged GET on object storage. The writer (`write`) and the key index (`read::index`)
/// both follow it.
pub const ROW_GROUP_ROWS: usize = 512;
const RESERVED: [&str; 3] = [ENTITY_KEY, EVENT_TS, CREATED_TS];

/// Table property holding `{column: Feast ValueType}` for join keys and features.
pub const PROP_VALUE_TYPES: &str = "feast.value-types";
/// Table property holding the join key column names, in Feast's order.
pub const PROP_JOIN_KEYS: &str = "feast.join-keys";
/// Table property holding the bucket count of `bucket[N](entity_key)`: the partition spec is
/// what counts; the property follows it for readers of older versions of this store.
pub const PROP_BUCKETS: &str = "feast.bucket-count";
/// The partition field of every spec of ours (a re-bucketed spec keeps the name, so the data
/// directories stay `entity_key_bucket=<b>`).
const BUCKET_FIELD: &str = "entity_key_bucket";
/// The most buckets a table gets (`partition_count` and re-bucketing alike).
pub const MAX_BUCKETS: u32 = 4096;

/// Feast scalar kinds with an exact Iceberg twin. The discriminant is Feast's `ValueType`
/// number, which is also the `Value` oneof field number of the scalar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scalar {
    Bytes = 1,
    String = 2,
    Int32 = 3,
    Int64 = 4,
    Double = 5,
    Float = 6,
    Bool = 7,
    UnixTimestamp = 8,
}

impl Scalar {
    fn from_number(n: i32) -> Option<Self> {
        Some(match n {
            1 => Self::Bytes,
            2 => Self::String,
            3 => Self::Int32,
            4 => Self::Int64,
            5 => Self::Double,
            6 => Self::Float,
            7 => Self::Bool,
            8 => Self::UnixTimestamp,
            _ => return None,
        })
    }

    pub fn primitive(self) -> PrimitiveType {
        match self {
            Self::Bytes => PrimitiveType::Binary,
            Self::String => PrimitiveType::String,
            Self::Int32 => PrimitiveType::Int,
            Self::Int64 => PrimitiveType::Long,
            Self::Double => PrimitiveType::Double,
            Self::Float => PrimitiveType::Float,
            Self::Bool => PrimitiveType::Boolean,
            Self::UnixTimestamp => PrimitiveType::Timestamptz,
        }
    }
}

/// How a Feast value type is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnKind {
    Scalar(Scalar),
    List(Scalar),
    Set(Scalar),
    /// The serialized `Value` proto, for kinds without an exact Iceberg twin.
    Proto,
}

/// Feast `ValueType` numbers (feast/protos/feast/types/Value.proto).
const LIST_OFFSET: i32 = 10;
const SET_OFFSET: i32 = 21;
const MAX_VALUE_TYPE: i32 = 48;

impl ColumnKind {
    pub fn from_value_type(value_type: i32) -> Result<Self> {
        if let Some(s) = Scalar::from_number(value_type) {
            return Ok(Self::Scalar(s));
        }
        if let Some(s) = Scalar::from_number(value_type - LIST_OFFSET) {
            return Ok(Self::List(s));
        }
        if let Some(s) = Scalar::from_number(value_type - SET_OFFSET) {
            return Ok(Self::Set(s));
        }
        if (1..=MAX_VALUE_TYPE).contains(&value_type) {
            return Ok(Self::Proto);
        }
        Err(Error::schema(format!(
            "unsupported Feast value type {value_type}"
        )))
    }

    /// The `Value` oneof field number a typed column accepts (None for proto columns).
    pub fn value_tag(self) -> Option<u32> {
        let n = match self {
            Self::Scalar(s) => s as i32,
            Self::List(s) => s as i32 + LIST_OFFSET,
            Self::Set(s) => s as i32 + SET_OFFSET,
            Self::Proto => return None,
        };
        u32::try_from(n).ok()
    }

    fn iceberg_type(self, next_id: &mut i32) -> Type {
        match self {
            Self::Scalar(s) => Type::Primitive(s.primitive()),
            Self::List(s) | Self::Set(s) => {
                let id = *next_id;
                *next_id += 1;
                Type::List(ListType {
                    element_field: Arc::new(NestedField::list_element(
                        id,
                        Type::Primitive(s.primitive()),
                        true,
                    )),
                })
            }
            Self::Proto => Type::Primitive(PrimitiveType::Binary),
        }
    }
}

/// A join key or feature column as Feast declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnSpec {
    pub name: String,
    pub value_type: i32,
}

/// A column of a loaded table.
#[derive(Clone, Debug)]
pub struct Column {
    pub name: String,
    pub value_type: i32,
    pub kind: ColumnKind,
    /// Position in the table's Arrow schema.
    pub index: usize,
}

/// Everything the read and write paths need to know about a table's columns.
#[derive(Debug)]
pub struct Layout {
    pub schema: Arc<Schema>,
    pub arrow: SchemaRef,
    pub join_keys: Vec<Column>,
    pub features: Vec<Column>,
    pub entity_key: usize,
    pub event_ts: usize,
    pub created_ts: usize,
    pub buckets: u32,
}

fn validate_columns(join_keys: &[ColumnSpec], features: &[ColumnSpec]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for c in join_keys.iter().chain(features) {
        if c.name.is_empty() || RESERVED.contains(&c.name.as_str()) {
            return Err(Error::schema(format!(
                "column name {:?} is empty or reserved ({RESERVED:?})",
                c.name
            )));
        }
        if !seen.insert(c.name.as_str()) {
            return Err(Error::schema(format!(
                "column {:?} is declared twice",
                c.name
            )));
        }
        ColumnKind::from_value_type(c.value_type)
            .map_err(|e| e.context(format!("column {:?}", c.name)))?;
    }
    Ok(())
}

fn column_doc(c: &ColumnSpec, kind: ColumnKind) -> String {
    match kind {
        ColumnKind::Proto => format!(
            "Feast ValueType {}: serialized feast.types.Value protobuf",
            c.value_type
        ),
        _ => format!("Feast ValueType {}", c.value_type),
    }
}

fn field_for(c: &ColumnSpec, id: i32, next_id: &mut i32) -> Result<NestedFieldRef> {
    let kind = ColumnKind::from_value_type(c.value_type)?;
    Ok(Arc::new(
        NestedField::optional(id, &c.name, kind.iceberg_type(next_id))
            .with_doc(column_doc(c, kind)),
    ))
}

/// The schema of a new table. Field ids are reassigned by the metadata builder.
pub fn new_table_schema(join_keys: &[ColumnSpec], features: &[ColumnSpec]) -> Result<Schema> {
    validate_columns(join_keys, features)?;
    let mut fields: Vec<NestedFieldRef> = vec![Arc::new(
        NestedField::required(1, ENTITY_KEY, Type::Primitive(PrimitiveType::Binary))
            .with_doc("Feast serialized entity key (serialize_entity_key)"),
    )];
    let total = 3 + join_keys.len() + features.len();
    // Top-level ids first, nested list element ids after them.
    let mut next_nested = i32::try_from(total + 1).map_err(Error::internal)?;
    let mut id = 2;
    for c in join_keys {
        fields.push(field_for(c, id, &mut next_nested)?);
        id += 1;
    }
    fields.push(Arc::new(NestedField::required(
        id,
        EVENT_TS,
        Type::Primitive(PrimitiveType::Timestamptz),
    )));
    fields.push(Arc::new(NestedField::optional(
        id + 1,
        CREATED_TS,
        Type::Primitive(PrimitiveType::Timestamptz),
    )));
    id += 2;
    for c in features {
        fields.push(field_for(c, id, &mut next_nested)?);
        id += 1;
    }
    Ok(Schema::builder()
        .with_schema_id(0)
        .with_fields(fields)
        .with_identifier_field_ids([1])
        .build()?)
}

/// The table schema extended with features it lacks; `None` if nothing is new. A feature whose
/// Feast type changed is an error naming the column: silent coercion would corrupt reads.
pub fn evolved_schema(
    current: &Schema,
    declared: &BTreeMap<String, i32>,
    features: &[ColumnSpec],
    last_column_id: i32,
) -> Result<Option<Schema>> {
    validate_columns(&[], features)?;
    let mut added = Vec::new();
    let mut next_id = last_column_id + 1;
    for c in features {
        match declared.get(&c.name) {
            Some(&old) if old == c.value_type => {}
            Some(&old) => {
                return Err(Error::schema(format!(
                    "feature {:?} changed type from Feast ValueType {old} to {}; \
                     drop and re-create the feature view to change a type",
                    c.name, c.value_type
                )));
            }
            None => {
                if current.field_by_name(&c.name).is_some() {
                    return Err(Error::schema(format!(
                        "column {:?} exists but is not a feature of this table",
                        c.name
                    )));
                }
                let id = next_id;
                next_id += 1;
                let field = field_for(c, id, &mut next_id)?;
                added.push(field);
            }
        }
    }
    if added.is_empty() {
        return Ok(None);
    }
    let fields = current.as_struct().fields().iter().cloned().chain(added);
    Ok(Some(
        Schema::builder()
            .with_schema_id(current.schema_id() + 1)
            .with_fields(fields)
            .with_identifier_field_ids(current.identifier_field_ids())
            .build()?,
    ))
}

/// Table properties that record the Feast types of the columns.
pub fn type_properties(
    join_keys: &[ColumnSpec],
    declared: &BTreeMap<String, i32>,
) -> Result<HashMap<String, String>> {
    let join: Vec<&str> = join_keys.iter().map(|c| c.name.as_str()).collect();
    Ok(HashMap::from([
        (
            PROP_VALUE_TYPES.to_string(),
            serde_json::to_string(declared)?,
        ),
        (PROP_JOIN_KEYS.to_string(), serde_json::to_string(&join)?),
    ]))
}

/// The declared Feast types of a table (join keys and features).
pub fn declared_types(md: &TableMetadata) -> Result<BTreeMap<String, i32>> {
    let contrib = md.current_schema().field_by_name("entity_hash").is_some();
    if contrib && !md.properties().contains_key(PROP_VALUE_TYPES) {
        return Err(Error::schema(format!(
            "the table at {} was written by Feast's contrib Iceberg online store; convert it \
             with `feast-iceberg migrate` (then run `feast apply`)",
            md.location()
        )));
    }
    let raw = md.properties().get(PROP_VALUE_TYPES).ok_or_else(|| {
        Error::corrupt(
            md.location(),
            format!("missing property {PROP_VALUE_TYPES}"),
        )
    })?;
    serde_json::from_str(raw)
        .map_err(|e| Error::corrupt(md.location(), format!("bad {PROP_VALUE_TYPES}: {e}")))
}

/// The partition spec `bucket[n](entity_key)`, `key_field` being the id of `entity_key`.
pub fn bucket_spec(key_field: i32, n: u32) -> Result<UnboundPartitionSpec> {
    Ok(UnboundPartitionSpec::builder()
        .add_partition_field(key_field, BUCKET_FIELD, Transform::Bucket(n))?
        .build())
}

/// The N of the table's current partition spec when it is `bucket[N](entity_key)`.
pub fn spec_buckets(md: &TableMetadata) -> Option<u32> {
    let key = md.current_schema().field_by_name(ENTITY_KEY)?.id;
    match md.default_partition_spec().fields() {
        [field] if field.source_id == key => match field.transform {
            Transform::Bucket(n) => Some(n),
            _ => None,
        },
        _ => None,
    }
}

impl Layout {
    pub fn from_metadata(md: &TableMetadata) -> Result<Self> {
        let schema = md.current_schema().clone();
        let arrow = Arc::new(iceberg::arrow::schema_to_arrow_schema(&schema)?);
        let types = declared_types(md)?;
        let join_names: Vec<String> = md
            .properties()
            .get(PROP_JOIN_KEYS)
            .map(|s| serde_json::from_str(s))
            .transpose()
            .map_err(|e| Error::corrupt(md.location(), format!("bad {PROP_JOIN_KEYS}: {e}")))?
            .unwrap_or_default();
        let index_of = |name: &str| {
            arrow
                .index_of(name)
                .map_err(|_| Error::corrupt(md.location(), format!("column {name:?} is missing")))
        };
        let mut join_keys = Vec::new();
        let mut features = Vec::new();
        for field in arrow.fields() {
            let name = field.name();
            let Some(&value_type) = types.get(name) else {
                continue;
            };
            let col = Column {
                name: name.clone(),
                value_type,
                kind: ColumnKind::from_value_type(value_type)?,
                index: index_of(name)?,
            };
            if join_names.contains(name) {
                join_keys.push(col);
            } else {
                features.push(col);
            }
        }
        // The current spec decides which bucket a key is in (every engine prunes by it); the
        // property only for a spec that is not ours, whose files every lookup consults anyway.
        let buckets = spec_buckets(md)
            .or_else(|| md.properties().get(PROP_BUCKETS)?.parse().ok())
            .ok_or_else(|| Error::corrupt(md.location(), format!("missing {PROP_BUCKETS}")))?;
        Ok(Self {
            entity_key: index_of(ENTITY_KEY)?,
            event_ts: index_of(EVENT_TS)?,
            created_ts: index_of(CREATED_TS)?,
            schema,
            arrow,
            join_keys,
            features,
            buckets,
        })
    }

    pub fn feature(&self, name: &str) -> Option<&Column> {
        self.features.iter().find(|c| c.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_feast_value_types() {
        assert_eq!(
            ColumnKind::from_value_type(4).unwrap(),
            ColumnKind::Scalar(Scalar::Int64)
        );
        assert_eq!(
            ColumnKind::from_value_type(16).unwrap(),
            ColumnKind::List(Scalar::Float)
        );
        assert_eq!(
            ColumnKind::from_value_type(29).unwrap(),
            ColumnKind::Set(Scalar::UnixTimestamp)
        );
        assert_eq!(ColumnKind::from_value_type(20).unwrap(), ColumnKind::Proto);
        assert_eq!(ColumnKind::from_value_type(48).unwrap(), ColumnKind::Proto);
        assert!(ColumnKind::from_value_type(0).is_err());
        assert_eq!(ColumnKind::List(Scalar::Int64).value_tag(), Some(14));
        assert_eq!(ColumnKind::Set(Scalar::Bytes).value_tag(), Some(22));
    }

    #[test]
    fn schema_has_required_key_and_typed_columns() {
        let spec = |n: &str, t| ColumnSpec {
            name: n.into(),
            value_type: t,
        };
        let s = new_table_schema(
            &[spec("driver_id", 4)],
            &[spec("rate", 6), spec("tags", 12)],
        )
        .unwrap();
        let key = s.field_by_name(ENTITY_KEY).unwrap();
        assert!(key.required);
        assert_eq!(s.identifier_field_ids().collect::<Vec<_>>(), vec![key.id]);
        assert_eq!(
            *s.field_by_name("rate").unwrap().field_type,
            Type::Primitive(PrimitiveType::Float)
        );
        assert!(matches!(
            *s.field_by_name("tags").unwrap().field_type,
            Type::List(_)
        ));
        assert!(new_table_schema(&[], &[spec("event_ts", 4)]).is_err());
        assert!(new_table_schema(&[], &[spec("a", 4), spec("a", 4)]).is_err());
    }
}
