"""The Feast internals feast-iceberg relies on (python/feast_iceberg/_feast_compat.py), each
with a test that fails when Feast changes it.

Two kinds: behaviour (the call still does what we use it for), and, for the Feast code the
Arrow engine mirrors (`LocalComputeEngine._materialize_one`, `LocalOutputNode.execute`), a
fingerprint of its source: when Feast edits it, the fingerprint test fails and says which
copy to re-check; update the fingerprint once ours matches again.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
from datetime import datetime, timedelta, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from feast import (
    Entity,
    FeatureService,
    FeatureStore,
    FeatureView,
    Field,
    FileSource,
    RepoConfig,
    type_map,
)
from feast import utils as feast_utils
from feast.infra.compute_engines.local.compute import LocalComputeEngine
from feast.infra.compute_engines.local.feature_builder import LocalFeatureBuilder
from feast.infra.compute_engines.local.nodes import LocalOutputNode
from feast.infra.online_stores.helpers import compute_versioned_name
from feast.infra.online_stores.online_store import OnlineStore
from feast.types import Array, Float32, Int64
from feast.utils import _validate_vector_field_lengths
from feast.value_type import ValueType
from feast_iceberg import _feast_compat

T0 = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)


def fingerprint(obj: Any) -> str:
    """sha256 of the source without blank lines, comments and indentation changes."""
    lines = [line.strip() for line in inspect.getsource(obj).splitlines()]
    code = [line for line in lines if line and not line.startswith("#")]
    return hashlib.sha256("\n".join(code).encode()).hexdigest()[:16]


# Checked against feast 0.67.0 (the pinned minor release).
FINGERPRINTS = {
    # _feast_compat.materialize_one is a copy of it with another feature builder.
    "LocalComputeEngine._materialize_one": (
        LocalComputeEngine._materialize_one,
        "c2f9f1cc087ed1b8",
    ),
    # engine._ArrowFeatureBuilder overrides it to put ArrowOutputNode in its place.
    "LocalFeatureBuilder.build_output_nodes": (
        LocalFeatureBuilder.build_output_nodes,
        "1ad85074ec4f7d34",
    ),
    # ArrowOutputNode.execute does its online half natively (batch size, vector check) and
    # its offline half as it does.
    "LocalOutputNode.execute": (LocalOutputNode.execute, "dccddf71205f7b29"),
    # The synthetic view's name and shape, which online_store.py recognises.
    "OnlineStore.write_precomputed_vector": (
        OnlineStore.write_precomputed_vector,
        "5b29632c0b613d48",
    ),
    "OnlineStore.read_precomputed_vectors": (
        OnlineStore.read_precomputed_vectors,
        "b10ebc45dded15a5",
    ),
    # ViewReadHooks.get_online_features(_async) answer a request whole (read_request) in
    # place of these: what they build for requests of feature views only (the join-key
    # columns first, every value PRESENT with an unset timestamp; the feature types; nothing
    # dropped) is what the core encodes (read/response.rs) and online_store.py passes on.
    "OnlineStore.get_online_features": (OnlineStore.get_online_features, "315cc36e77ca2cc1"),
    "OnlineStore.get_online_features_async": (
        OnlineStore.get_online_features_async,
        "f2f169ef07e980be",
    ),
    "utils._prepare_entities_to_read_from_online_store": (
        feast_utils._prepare_entities_to_read_from_online_store,
        "4b231496a09880eb",
    ),
    "utils._populate_result_rows_from_columnar": (
        feast_utils._populate_result_rows_from_columnar,
        "a67cf67c9a2f1656",
    ),
    "utils._drop_unneeded_columns": (feast_utils._drop_unneeded_columns, "841f1668c0c9e0e3"),
    # The core encodes a request's Python ints and strs of Int32, Int64 and String join keys
    # as this does (online_store._is_raw); anything else goes through it.
    "type_map._convert_scalar_values_to_proto": (
        type_map._convert_scalar_values_to_proto,
        "16ae7ea0c07c9cd6",
    ),
}


@pytest.mark.parametrize("name", sorted(FINGERPRINTS))
def test_mirrored_feast_code_is_unchanged(name: str) -> None:
    obj, expected = FINGERPRINTS[name]
    assert fingerprint(obj) == expected, (
        f"Feast changed {name}: re-check feast_iceberg's copy or use of it "
        "(_feast_compat.py, engine.py, online_store.py), then update FINGERPRINTS"
    )


def test_installed_feast_is_within_the_declared_range() -> None:
    """The package pins the Feast minor release these internals were checked against."""
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    (spec,) = re.findall(r'^\s*"(feast[<>=][^"]*)"', pyproject, re.MULTILINE)
    bounds = dict(re.findall(r"(>=|<)\s*([\d.]+)", spec))
    installed = tuple(int(p) for p in version("feast").split(".")[:2])
    low = tuple(int(p) for p in bounds[">="].split(".")[:2])
    high = tuple(int(p) for p in bounds["<"].split(".")[:2])
    assert low <= installed < high, f"feast {version('feast')} outside {spec}"
    assert high == (low[0], low[1] + 1), f"{spec} spans more than the tested minor release"


def test_the_engine_hooks_keep_their_signatures() -> None:
    def params(fn: Any) -> list[str]:
        return list(inspect.signature(fn).parameters)

    assert params(LocalComputeEngine._materialize_one) == ["self", "registry", "task", "kwargs"]
    assert params(LocalComputeEngine.get_execution_context) == ["self", "registry", "task"]
    assert params(LocalComputeEngine._get_backend) == ["self", "context"]
    assert params(LocalFeatureBuilder.__init__) == ["self", "registry", "task", "backend"]
    assert params(LocalFeatureBuilder.build_output_nodes) == ["self", "view", "input_node"]
    assert params(LocalOutputNode.__init__) == ["self", "name", "feature_view", "inputs"]
    assert params(LocalOutputNode.get_single_table) == ["self", "context"]
    assert "node_outputs" in inspect.getsource(LocalOutputNode.execute)


HOOK_PARAMS = [
    "self",
    "config",
    "grouped_refs",
    "join_key_values",
    "entity_name_to_join_key_map",
    "online_features_response",
    "full_feature_names",
    "include_feature_view_version_metadata",
]


@pytest.mark.parametrize("hook", ["_read_features_per_fv", "_read_features_per_fv_async"])
def test_the_per_request_read_hooks_keep_their_signatures(hook: str) -> None:
    # ViewReadHooks takes the arguments positionally, in this order, into ViewsRequest.
    assert list(inspect.signature(getattr(OnlineStore, hook)).parameters) == HOOK_PARAMS
    assert list(_feast_compat.ViewsRequest.__dataclass_fields__) == [
        "config",
        "grouped_refs",
        "join_key_values",
        "entity_name_to_join_key_map",
        "response",
        "full_feature_names",
        "include_feature_view_version_metadata",
    ]


@pytest.mark.parametrize(
    ("method", "hook"),
    [
        ("get_online_features", "_read_features_per_fv"),
        ("get_online_features_async", "_read_features_per_fv_async"),
    ],
)
def test_get_online_features_reads_through_the_hook(method: str, hook: str) -> None:
    # Feast's precomputed vectors aside, every read of a request goes through the hook.
    source = inspect.getsource(getattr(OnlineStore, method))
    assert source.count(f"self.{hook}(") == 1
    assert "online_read" not in source.replace("read_precomputed_vectors", "")


@pytest.mark.parametrize("method", ["get_online_features", "get_online_features_async"])
def test_get_online_features_keeps_its_signature(method: str) -> None:
    # ViewReadHooks overrides it and hands its arguments on positionally.
    assert list(inspect.signature(getattr(OnlineStore, method)).parameters) == list(
        inspect.signature(getattr(_feast_compat.ViewReadHooks, method)).parameters
    )
    assert list(inspect.signature(getattr(OnlineStore, method)).parameters) == [
        "self",
        "config",
        "features",
        "entity_rows",
        "registry",
        "project",
        "full_feature_names",
        "include_feature_view_version_metadata",
    ]


def test_request_context_is_feasts_cached_resolution(tmp_path: Path) -> None:
    fs, _ = arrow_engine_store(tmp_path)
    view = fs.get_feature_view("docs")
    fs.apply([FeatureService(name="svc", features=[view])])
    registry, project = fs.registry, fs.project
    for features in (["docs:embedding"], fs.get_feature_service("svc")):
        context = feast_utils._get_cached_request_context(registry, project, features, True)
        # The same object while the registry cache holds: plans are cached against it.
        assert feast_utils._get_cached_request_context(registry, project, features, True) is (
            context
        )
        refs, odfvs, name_to_key, types, keys, grouped, names, request_data, entityless = context
        assert refs == ["docs:embedding"] and odfvs == [] and not entityless
        assert name_to_key["doc"] == "doc_id" and "doc_id" in keys
        assert types == {"doc_id": ValueType.INT64}
        ((table, requested),) = grouped
        assert table.name == "docs" and requested == ["embedding"]
        assert names == frozenset({"docs__embedding"}) and not request_data
        request = _feast_compat.online_request(
            fs.config, features, [{"doc_id": 1}], registry, project, True, False
        )
        assert request is not None and request.context is context
        assert request.columns == {"doc_id": [1]}
        assert _feast_compat.feature_types(grouped) == {
            "embedding": ValueType.FLOAT_LIST,
            "docs__embedding": ValueType.FLOAT_LIST,
        }


def test_int_and_str_join_keys_convert_as_the_core_encodes_them() -> None:
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    fields = type_map.PYTHON_SCALAR_VALUE_TYPE_TO_PROTO_VALUE
    assert {t: fields[t][0] for t in (ValueType.INT32, ValueType.INT64, ValueType.STRING)} == {
        ValueType.INT32: "int32_val",
        ValueType.INT64: "int64_val",
        ValueType.STRING: "string_val",
    }
    assert _feast_compat.entity_values_to_protos([0, -1], ValueType.INT64) == [
        ValueProto(int64_val=0),
        ValueProto(int64_val=-1),
    ]
    assert _feast_compat.entity_values_to_protos([""], ValueType.STRING) == [
        ValueProto(string_val="")
    ]


def test_online_read_latency_metric_keeps_its_signature() -> None:
    from feast.metrics import track_online_store_read

    assert list(inspect.signature(track_online_store_read).parameters) == ["duration_seconds"]
    _feast_compat.track_online_store_read(0.001)  # metrics off: a no-op


def test_table_entity_values_hands_back_the_requests_own_columns() -> None:
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    # The plans map each view's join keys to the request's columns through it.
    driver = Entity(name="driver", join_keys=["driver_id"], value_type=ValueType.INT64)
    view = FeatureView(name="stats", entities=[driver], schema=[], source=None)
    aliased = view.with_join_key_map({"driver_id": "other_id"})
    ids, others = [ValueProto(int64_val=1)], [ValueProto(int64_val=2)]
    columns = {"driver_id": ids, "other_id": others, "unused": []}
    mapping = {"driver": "driver_id"}
    assert _feast_compat.table_entity_values(view, mapping, columns) == {"driver_id": ids}
    got = _feast_compat.table_entity_values(aliased, mapping, columns)
    assert got == {"driver_id": others} and got["driver_id"] is others


def test_feature_status_metrics_keep_their_signature() -> None:
    from feast.metrics import track_feature_statuses

    params = list(inspect.signature(track_feature_statuses).parameters)
    assert params == ["feature_view_name", "present_count", "not_found_count"]
    _feast_compat.track_feature_statuses("stats", 1, 2)  # metrics off: a no-op


def test_versioned_name_is_feasts_naming() -> None:
    view = FeatureView(name="stats", entities=[], schema=[], source=None)
    assert compute_versioned_name is _feast_compat.compute_versioned_name
    assert _feast_compat.versioned_name(view, True) == "stats"  # v0: the unversioned table
    view.current_version_number = 3
    assert _feast_compat.versioned_name(view, False) == "stats"
    assert _feast_compat.versioned_name(view, True) == "stats_v3"
    view.projection.version_tag = 1  # a read of stats@v1
    assert _feast_compat.versioned_name(view, True) == "stats_v1"


def test_the_precomputed_view_is_recognised() -> None:
    written: list[Any] = []

    class Recorder(OnlineStore):
        def online_write_batch(self, config: Any, table: Any, data: Any, progress: Any) -> None:
            written.append(table)

        def online_read(self, *args: Any, **kwargs: Any) -> Any:
            return []

        def update(self, *args: Any, **kwargs: Any) -> None: ...

        def teardown(self, *args: Any, **kwargs: Any) -> None: ...

    Recorder().write_precomputed_vector(None, "svc", "p", None, b"x")  # type: ignore[arg-type]
    (view,) = written
    assert _feast_compat.is_precomputed_view(view)
    assert view.name == f"{_feast_compat.PRECOMPUTED_PREFIX}svc"
    assert [(f.name, f.dtype) for f in view.features] == [("vector", view.features[0].dtype)]
    assert view.entity_columns == []


def test_feast_vector_width_check_is_the_one_we_call() -> None:
    import pyarrow as pa

    view = FeatureView(
        name="docs",
        entities=[],
        schema=[Field(name="embedding", dtype=Array(Float32), vector_index=True, vector_length=2)],
        source=None,
    )
    ragged = pa.table({"embedding": [[1.0, 2.0], [1.0]]})
    with pytest.raises(ValueError):
        _validate_vector_field_lengths(ragged, view)
    with pytest.raises(ValueError):
        _feast_compat.validate_vector_widths(ragged, view)
    _feast_compat.validate_vector_widths(pa.table({"embedding": [[1.0, 2.0]]}), view)


def test_online_write_batch_size_is_read_from_the_repo_config(tmp_path: Path) -> None:
    base = {
        "project": "p",
        "registry": str(tmp_path / "r.db"),
        "provider": "local",
        "online_store": {"type": "sqlite", "path": str(tmp_path / "o.db")},
        "entity_key_serialization_version": 3,
    }
    assert _feast_compat.online_write_batch_size(RepoConfig(**base)) is None
    sized = RepoConfig(**base, materialization={"online_write_batch_size": 7})
    assert _feast_compat.online_write_batch_size(sized) == 7


# ---- the Arrow engine, end to end, on what it took from Feast ---------------------------


def arrow_engine_store(tmp_path: Path, **materialization: Any) -> tuple[FeatureStore, Any]:
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    path = tmp_path / "docs.parquet"
    pd.DataFrame(
        {
            "doc_id": [1, 2, 3, 4, 5],
            "embedding": [[float(i), 1.0] for i in range(5)],
            "event_timestamp": [T0] * 5,
        }
    ).to_parquet(path)
    doc = Entity(name="doc", join_keys=["doc_id"], value_type=ValueType.INT64)
    view = FeatureView(
        name="docs",
        entities=[doc],
        schema=[
            Field(name="doc_id", dtype=Int64),
            Field(name="embedding", dtype=Array(Float32), vector_index=True, vector_length=2),
        ],
        source=FileSource(name="docs_src", path=str(path), timestamp_field="event_timestamp"),
        ttl=timedelta(days=3650),
    )
    config = RepoConfig(
        project="compat",
        registry=str(repo / "data" / "registry.db"),
        provider="local",
        online_store={
            "type": "feast_iceberg.IcebergOnlineStore",
            "uri": f"sqlite:///{repo / 'data' / 'catalog.db'}",
            "warehouse": str(repo / "data" / "warehouse"),
        },
        offline_store={"type": "file"},
        batch_engine={"type": "feast_iceberg.IcebergArrowEngine"},
        entity_key_serialization_version=3,
        repo_path=repo,
        materialization=materialization,
    )
    fs = FeatureStore(config=config)
    fs.apply([doc, view])
    return fs, path


def test_arrow_engine_honours_online_write_batch_size(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fs, _ = arrow_engine_store(tmp_path, online_write_batch_size=2)
    with caplog.at_level(logging.DEBUG, logger="feast_iceberg.engine"):
        fs.materialize(T0 - timedelta(hours=1), T0 + timedelta(hours=1))
    (report,) = [r.getMessage() for r in caplog.records if "natively" in r.getMessage()]
    assert "'chunks': 3" in report  # 5 rows in writes of at most 2
    got = fs.get_online_features(
        features=["docs:embedding"], entity_rows=[{"doc_id": 5}, {"doc_id": 1}]
    ).to_dict()
    assert [list(v) for v in got["embedding"]] == [[4.0, 1.0], [0.0, 1.0]]


def test_arrow_engine_runs_feasts_vector_width_check(tmp_path: Path) -> None:
    fs, path = arrow_engine_store(tmp_path)
    ragged = pd.read_parquet(path)
    ragged["embedding"] = [
        [1.0, 2.0, 3.0] if i == 2 else list(v) for i, v in enumerate(ragged["embedding"])
    ]
    ragged.to_parquet(path)
    with pytest.raises(ValueError, match="embedding"):
        fs.materialize(T0 - timedelta(hours=1), T0 + timedelta(hours=1))
    store = fs._get_provider().online_store
    assert store._store(fs.config).stats("compat_docs_online")["records"] == 0
