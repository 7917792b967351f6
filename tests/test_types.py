"""Every Feast value type round-trips exactly (ValueProto in == ValueProto out), typed columns
are stored with their exact Iceberg type, and entity keys are serialized byte-identical to
Feast's `serialize_entity_key`."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pytest
from conftest import BASE_TS, Env, driver_key
from feast import Entity, FeatureView, Field, FileSource
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import RepeatedValue
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.types import Int64, from_value_type
from feast.value_type import ValueType
from feast_iceberg import _internal
from feast_iceberg.online_store import table_name
from google.protobuf.descriptor import FieldDescriptor

NAN_TS = -(2**63)
FD = FieldDescriptor


def _scalar_samples(field: FieldDescriptor, timestamp: bool = False) -> list[Any]:
    """Two distinct values of a scalar proto field, exact in its type."""
    if (timestamp or field.name.startswith("unix_timestamp")) and field.type == FD.TYPE_INT64:
        return [1_767_225_600, NAN_TS]
    by_type: dict[int, list[Any]] = {
        FD.TYPE_BYTES: [b"\x00\xffbytes", b""],
        FD.TYPE_STRING: ["héllo", ""],
        FD.TYPE_INT32: [-(2**31), 7],
        FD.TYPE_INT64: [2**62, -3],
        FD.TYPE_DOUBLE: [3.141592653589793, -0.0],
        FD.TYPE_FLOAT: [0.375, -2.5],
        FD.TYPE_BOOL: [True, False],
        FD.TYPE_ENUM: [0, 0],
    }
    if field.name in ("uuid_val", "time_uuid_val") or "uuid" in field.name:
        return ["6ba7b810-9dad-11d1-80b4-00c04fd430c8", "01234567-89ab-cdef-0123-456789abcdef"]
    return by_type[field.type]


def _fill(message: Any, depth: int = 0, timestamp: bool = False) -> None:
    """Fills every field of a message with sample data (bounded recursion through Value).
    `timestamp`: the message holds unix timestamps (seconds), which have a range."""
    for field in message.DESCRIPTOR.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            container = getattr(message, field.name)
            if value_field.message_type is None:
                container["k"] = _scalar_samples(value_field)[0]
            elif depth < 2:
                _fill_value_like(container["k"], depth + 1)
        elif field.is_repeated:
            container = getattr(message, field.name)
            if field.message_type is None:
                container.extend(_scalar_samples(field, timestamp))
            elif depth < 2:
                _fill_value_like(container.add(), depth + 1)
        elif field.message_type is not None:
            if depth < 2:
                _fill_value_like(getattr(message, field.name), depth + 1)
        elif field.containing_oneof is None:
            setattr(message, field.name, _scalar_samples(field, timestamp)[0])


def _fill_value_like(message: Any, depth: int) -> None:
    if message.DESCRIPTOR.full_name == "feast.types.Value":
        message.int64_val = 42 + depth
    else:
        _fill(message, depth)


def value_types() -> list[tuple[str, int]]:
    """(oneof field holding the value, Feast ValueType number) for every kind the installed Feast
    defines. The oneof field numbers equal the ValueType numbers; the bytes-backed kinds
    (PDF_BYTES, IMAGE_BYTES) have no field of their own and travel as `bytes_val`."""
    out = []
    for field in ValueProto.DESCRIPTOR.oneofs_by_name["val"].fields:
        if field.name != "null_val":
            out.append((field.name, ValueType(field.number).value))
    for name in ("PDF_BYTES", "IMAGE_BYTES"):
        if name in ValueType.__members__:
            out.append(("bytes_val", ValueType[name].value))
    return out


def samples(field_name: str) -> list[ValueProto]:
    """A few values of one kind: a full one, an empty container where it is one, and unset."""
    field = ValueProto.DESCRIPTOR.fields_by_name[field_name]
    full = ValueProto()
    empty: ValueProto | None = None
    if field.message_type is None:
        full_value, other = _scalar_samples(field)
        setattr(full, field_name, full_value)
        empty = ValueProto()
        setattr(empty, field_name, other)
    else:
        _fill(getattr(full, field_name), timestamp="timestamp" in field_name)
        empty = ValueProto()
        getattr(empty, field_name).SetInParent()
    return [full, empty, ValueProto(), ValueProto(null_val=0)]


def test_every_feast_value_type_round_trips_exactly(env: Env) -> None:
    kinds = value_types()
    assert len(kinds) >= 45, kinds  # the classic 28 kinds, plus whatever this Feast adds
    store = env.store._store(env.config)
    features = [(f"f_{vt}", vt) for _, vt in kinds]
    store.ensure_table("types_online", [("driver_id", ValueType.INT64.value)], features)
    per_kind = {vt: samples(field) for field, vt in kinds}
    rows = 4
    keys = [driver_key(i).SerializeToString() for i in range(rows)]
    values = [per_kind[vt][i].SerializeToString() for i in range(rows) for _, vt in kinds]
    micros = [1_767_225_600_000_000 + i for i in range(rows)]
    store.write("types_online", [n for n, _ in features], keys, values, micros, [None] * rows)
    names, timestamps, got = store.read("types_online", keys, None)
    assert timestamps == micros
    for i in range(rows):
        row = dict(zip(names, RepeatedValue.FromString(got[i]).val, strict=True))
        for field, vt in kinds:
            expect = per_kind[vt][i]
            if expect.WhichOneof("val") == "null_val":
                expect = ValueProto()  # an explicit null reads back as null
            assert row[f"f_{vt}"] == expect, (field, vt, i)


def test_typed_columns_have_their_exact_iceberg_types(env: Env) -> None:
    store = env.store._store(env.config)
    store.ensure_table(
        "typed_online",
        [("driver_id", ValueType.INT64.value)],
        [
            ("f32", ValueType.FLOAT.value),
            ("i32", ValueType.INT32.value),
            ("ts", ValueType.UNIX_TIMESTAMP.value),
            ("tags", ValueType.STRING_LIST.value),
            ("ids", ValueType.INT64_SET.value),
            ("m", ValueType.MAP.value),
        ],
    )
    table = env.catalog().load_table("feast_online.typed_online")
    types = {f.name: str(f.field_type) for f in table.schema().fields}
    assert types["entity_key"] == "binary"
    assert types["driver_id"] == "long"
    assert types["event_ts"] == "timestamptz" and types["created_ts"] == "timestamptz"
    assert types["f32"] == "float" and types["i32"] == "int"
    assert types["ts"] == "timestamptz"
    assert types["tags"] == "list<string>" and types["ids"] == "list<long>"
    assert types["m"] == "binary"
    assert "serialized feast.types.Value" in (table.schema().find_field("m").doc or "")
    assert table.schema().find_field("entity_key").required
    spec = table.spec()
    assert [str(f.transform) for f in spec.fields] == ["bucket[16]"]
    props = table.properties
    assert json.loads(props["feast.value-types"])["f32"] == ValueType.FLOAT.value
    # The property says what our files are, for other writers to follow.
    assert props["write.parquet.compression-codec"] == "lz4"


def feast_typed_view() -> FeatureView:
    """A feature view with one feature per Feast type that has a FeastType."""
    fields = [Field(name="driver_id", dtype=Int64)]
    for _, vt in value_types():
        try:
            dtype = from_value_type(ValueType(vt))
        except (ValueError, KeyError):
            continue  # kinds Feast itself offers no FeastType for are covered above
        fields.append(Field(name=f"f_{vt}", dtype=dtype))
    return FeatureView(
        name="typed",
        entities=[Entity(name="driver", join_keys=["driver_id"], value_type=ValueType.INT64)],
        ttl=timedelta(days=1),
        schema=fields,
        source=FileSource(name="typed_src", path="unused.parquet", timestamp_field="ts"),
    )


@pytest.mark.backends
def test_feature_view_of_every_feast_type_round_trips_through_feast_interface(env: Env) -> None:
    view = feast_typed_view()
    assert len(view.features) >= 20
    env.apply(view)
    by_type = {vt: samples(field) for field, vt in value_types()}
    rows = []
    for i in range(3):
        feats = {f.name: by_type[int(f.name.removeprefix("f_"))][i] for f in view.features}
        rows.append((driver_key(i), feats, BASE_TS, None))
    env.write(view, rows)
    results = env.read(view, [driver_key(i) for i in range(3)])
    for (_, sent, _, _), (_, got) in zip(rows, results, strict=True):
        assert got == sent


def _key(*pairs: tuple[str, ValueProto]) -> EntityKeyProto:
    return EntityKeyProto(join_keys=[p[0] for p in pairs], entity_values=[p[1] for p in pairs])


ENTITY_KEYS = [
    _key(("driver_id", ValueProto(int64_val=1001))),
    _key(("driver_id", ValueProto(int64_val=-(2**63)))),
    _key(("n", ValueProto(int32_val=-7))),
    _key(("customer", ValueProto(string_val="ümlaut-ä"))),
    _key(("blob", ValueProto(bytes_val=b"\x00\x01\xff"))),
    _key(("at", ValueProto(unix_timestamp_val=1_767_225_600))),
    _key(("b", ValueProto(string_val="x")), ("a", ValueProto(int64_val=5))),
    _key(
        ("zone", ValueProto(string_val="eu")),
        ("Zeta", ValueProto(int32_val=1)),
        ("alpha", ValueProto(bytes_val=b"k")),
    ),
]


@pytest.mark.parametrize("key", ENTITY_KEYS, ids=lambda k: "+".join(k.join_keys))
def test_entity_keys_serialize_byte_identical_to_feast(key: EntityKeyProto) -> None:
    ours = _internal.serialize_entity_keys([key.SerializeToString()], 3)
    assert ours == [serialize_entity_key(key, entity_key_serialization_version=3)]


def test_stored_entity_key_column_is_feasts_serialization(env: Env) -> None:
    from conftest import driver_row, driver_view

    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(i, 1) for i in range(50)])
    scanned = env.pyiceberg_table(view).scan().to_arrow()
    by_id = dict(
        zip(scanned.column("driver_id").to_pylist(), scanned.column("entity_key"), strict=True)
    )
    for i in range(50):
        expect = serialize_entity_key(driver_key(i), entity_key_serialization_version=3)
        assert by_id[i].as_py() == expect


def test_unsupported_entity_value_is_a_typed_error(env: Env) -> None:
    from feast_iceberg import InvalidInputError

    bad = _key(("x", ValueProto(double_val=1.5))).SerializeToString()
    with pytest.raises(InvalidInputError):
        _internal.serialize_entity_keys([bad], 3)


def test_naive_and_aware_event_timestamps_mean_the_same_instant(env: Env) -> None:
    from datetime import timezone

    from conftest import driver_row, driver_view

    view = driver_view()
    env.apply(view)
    naive = datetime(2026, 3, 1, 10, 0, 0, 5)
    key, feats, _, _ = driver_row(1, 1)
    env.write(view, [(key, feats, naive.replace(tzinfo=timezone.utc), None)])
    ((ts, _),) = env.read(view, [key])
    assert ts == naive.replace(tzinfo=timezone.utc)
    assert table_name(env.config, view) == "test_driver_stats_online"
