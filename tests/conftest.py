"""Shared fixtures: a Feast RepoConfig on a real catalog + warehouse (an SQLite file and a
local directory by default; PostgreSQL or SeaweedFS's REST catalog + S3 for the tests marked
`backends`), feature views, and helpers to build rows and read the tables back with PyIceberg.

Backends: tests marked `@pytest.mark.backends` (module-wide or per test) run once per backend
named in env `FEAST_ICEBERG_BACKENDS` (comma list, default `DEFAULT_BACKENDS`);
`@pytest.mark.backends("sqlite")` narrows a test to the named ones. Unmarked tests run on
SQLite only. The servers a backend needs start on first use, once per session (tests/servers.py);
one that cannot be installed skips its tests, or fails them with FEAST_ICEBERG_REQUIRE_SERVERS=1.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import servers
from feast import Entity, FeatureView, Field, FileSource
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import RepoConfig
from feast.types import Float32, Float64, Int64, String
from feast.value_type import ValueType
from feast_iceberg import IcebergOnlineStore
from feast_iceberg.online_store import table_name

PROJECT = "test"
NAMESPACE = "feast_online"
BASE_TS = datetime(2026, 1, 1, 12, 0, 0)

BACKENDS = ("sqlite", "postgres", "rest-s3")
DEFAULT_BACKENDS = "sqlite,postgres,rest-s3"

Row = tuple[EntityKeyProto, dict[str, ValueProto], datetime, datetime | None]


def repo_config(repo: Path, **online: Any) -> RepoConfig:
    """A RepoConfig whose online store is ours, on an SQLite catalog under `repo/data`."""
    store: dict[str, Any] = {
        "type": "feast_iceberg.IcebergOnlineStore",
        "uri": f"sqlite:///{repo / 'data' / 'catalog.db'}",
        "warehouse": str(repo / "data" / "warehouse"),
    }
    store.update(online)
    return RepoConfig(
        project=PROJECT,
        registry=str(repo / "data" / "registry.db"),
        provider="local",
        online_store=store,
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
        repo_path=repo,
    )


driver = Entity(name="driver", join_keys=["driver_id"], value_type=ValueType.INT64)

DRIVER_FEATURES = ["conv_rate", "acc_rate", "trips", "city"]


def driver_view(name: str = "driver_stats", extra: Iterable[Field] = ()) -> FeatureView:
    return FeatureView(
        name=name,
        entities=[driver],
        ttl=timedelta(days=1),
        schema=[
            Field(name="driver_id", dtype=Int64),
            Field(name="conv_rate", dtype=Float32),
            Field(name="acc_rate", dtype=Float64),
            Field(name="trips", dtype=Int64),
            Field(name="city", dtype=String),
            *extra,
        ],
        source=FileSource(name=f"{name}_src", path="unused.parquet", timestamp_field="ts"),
    )


def driver_key(i: int) -> EntityKeyProto:
    return EntityKeyProto(join_keys=["driver_id"], entity_values=[ValueProto(int64_val=i)])


def driver_row(i: int, version: int, ts: datetime | None = None) -> Row:
    """Values derived from (key, version), exact in float32, so reads can be checked exactly."""
    features = {
        "conv_rate": ValueProto(float_val=(i % 64) / 64 + version),
        "acc_rate": ValueProto(double_val=i * 0.5 + version),
        "trips": ValueProto(int64_val=i * 1000 + version),
        "city": ValueProto(string_val=f"city-{i}-{version}"),
    }
    event = ts or BASE_TS + timedelta(minutes=version)
    return (driver_key(i), features, event, event + timedelta(seconds=1))


def expected_values(i: int, version: int) -> dict[str, Any]:
    return {
        "conv_rate": (i % 64) / 64 + version,
        "acc_rate": i * 0.5 + version,
        "trips": i * 1000 + version,
        "city": f"city-{i}-{version}",
    }


def plain(value: ValueProto) -> Any:
    """The Python value a ValueProto holds (None when unset)."""
    kind = value.WhichOneof("val")
    return None if kind is None else getattr(value, kind)


def pyiceberg_catalog(config: RepoConfig) -> Any:
    """PyIceberg's view of the catalog our store uses, built from the same online_store block
    the way the contrib store builds its catalog (storage_options are catalog properties)."""
    from pyiceberg.catalog import load_catalog

    online = config.online_store
    resolved = json.loads(online.to_store_json(config.repo_path, 3))
    return load_catalog(
        online.catalog_name,
        type=online.catalog_type,
        uri=resolved["uri"],
        warehouse=resolved["warehouse"],
        **online.storage_options,
    )


@dataclass
class Env:
    """A store, its repo config and helpers for one test. `online` holds the online_store
    fields the config was built from, for processes that build their own config."""

    repo: Path
    config: RepoConfig
    store: IcebergOnlineStore
    online: dict[str, Any] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return str(self.config.online_store.namespace)

    def apply(self, *views: FeatureView) -> None:
        self.store.update(self.config, [], list(views), [], [driver], partial=False)

    def write(self, view: FeatureView, rows: list[Row]) -> None:
        self.store.online_write_batch(self.config, view, rows, None)

    def read(
        self, view: FeatureView, keys: list[EntityKeyProto], features: list[str] | None = None
    ) -> list[tuple[datetime | None, dict[str, ValueProto] | None]]:
        return self.store.online_read(self.config, view, keys, features)

    def stats(self, view: FeatureView) -> dict[str, Any]:
        return self.store._store(self.config).stats(table_name(self.config, view))

    def catalog(self) -> Any:
        return pyiceberg_catalog(self.config)

    def pyiceberg_table(self, view: FeatureView) -> Any:
        return self.catalog().load_table(f"{self.namespace}.{table_name(self.config, view)}")

    def warehouse_files(self) -> list[Path]:
        warehouse = self.config.online_store.warehouse
        assert warehouse is None or "://" not in warehouse, "only local warehouses are listed"
        return [p for p in (self.repo / "data" / "warehouse").rglob("*") if p.is_file()]


def selected_backends() -> list[str]:
    names = [
        n.strip()
        for n in os.environ.get("FEAST_ICEBERG_BACKENDS", DEFAULT_BACKENDS).split(",")
        if n.strip()
    ]
    unknown = set(names) - set(BACKENDS)
    if unknown:
        raise pytest.UsageError(
            f"FEAST_ICEBERG_BACKENDS: unknown {sorted(unknown)}; use {BACKENDS}"
        )
    return names


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "backends(*names): run over the backends in FEAST_ICEBERG_BACKENDS (only the named "
        "ones, when names are given)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is not None and "backend" in metafunc.fixturenames:
        names = [n for n in selected_backends() if not marker.args or n in marker.args]
        metafunc.parametrize("backend", names, indirect=True)


class _Server(Protocol):
    def close(self) -> None: ...


T = TypeVar("T", bound=_Server)


def start_server(request: pytest.FixtureRequest, start: Callable[[], T]) -> T:
    """Starts a server for the rest of `request`'s scope. One that cannot be installed skips
    the tests that need it, unless FEAST_ICEBERG_REQUIRE_SERVERS=1 (CI) makes that a failure."""
    try:
        server = start()
    except servers.ServerUnavailable as e:
        if os.environ.get("FEAST_ICEBERG_REQUIRE_SERVERS") == "1":
            pytest.fail(f"{e} (and FEAST_ICEBERG_REQUIRE_SERVERS=1)", pytrace=False)
        print(f"skipping: {e}")
        pytest.skip(str(e))
    request.addfinalizer(server.close)
    return server


@pytest.fixture(scope="session")
def postgres_server(request: pytest.FixtureRequest) -> servers.PostgresServer:
    return start_server(request, servers.start_postgres)


@pytest.fixture(scope="session")
def seaweed_server(request: pytest.FixtureRequest) -> servers.SeaweedServer:
    return start_server(request, servers.start_seaweed)


# The session's servers are shared by every test: each repo gets a namespace of its own.
# Lowercase a-z0-9_ only: SeaweedFS's REST catalog refuses anything else.
_namespaces = itertools.count()


def fresh_namespace() -> str:
    return f"{NAMESPACE}_{next(_namespaces)}"


@dataclass(frozen=True)
class Backend:
    """A catalog + warehouse kind. `options(repo)` gives the online_store fields for a new
    repo (on top of `repo_config`'s SQLite defaults)."""

    name: str
    options: Callable[[Path], dict[str, Any]]


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Backend:
    name = getattr(request, "param", "sqlite")
    if name == "sqlite":
        return Backend(name, lambda repo: {})
    if name == "postgres":
        pg: servers.PostgresServer = request.getfixturevalue("postgres_server")
        return Backend(
            name,
            lambda repo: {
                **servers.postgres_online_store(pg),
                "warehouse": str(repo / "data" / "warehouse"),
                "namespace": fresh_namespace(),
            },
        )
    if name == "rest-s3":
        sw: servers.SeaweedServer = request.getfixturevalue("seaweed_server")
        return Backend(
            name,
            lambda repo: {**servers.rest_s3_online_store(sw), "namespace": fresh_namespace()},
        )
    raise AssertionError(name)


@pytest.fixture
def make_env(tmp_path: Path, backend: Backend) -> Callable[..., Env]:
    def make(**online: Any) -> Env:
        repo = tmp_path / f"repo{len(list(tmp_path.iterdir()))}"
        (repo / "data").mkdir(parents=True)
        options = {**backend.options(repo), **online}
        return Env(repo, repo_config(repo, **options), IcebergOnlineStore(), options)

    return make


@pytest.fixture
def env(make_env: Callable[..., Env]) -> Env:
    return make_env()


# ---- the distributed engines (tests/test_spark_engine.py, tests/test_ray_engine.py) ---------


@pytest.fixture(scope="session")
def engine_faults(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory of the engines' fault hook (`feast_iceberg.distributed.FAULTS_ENV`). It is
    in the environment before Spark's JVM and Ray's workers start, so they inherit it; a test
    arms it by creating a marker file there."""
    from feast_iceberg.distributed import FAULTS_ENV

    path = tmp_path_factory.mktemp("engine_faults")
    os.environ[FAULTS_ENV] = str(path)
    return path


@pytest.fixture(scope="session")
def spark(engine_faults: Path) -> Any:
    """One local SparkSession for the session: 2 threads, and up to 4 attempts per task
    (`local[N,F]`; plain `local[N]` never retries a task)."""
    pytest.importorskip("pyspark")
    from pyspark.sql import SparkSession

    # The workers must run this interpreter (its venv holds feast_iceberg).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (
        SparkSession.builder.master("local[2,4]")
        .appName("feast-iceberg-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.memory", "1g")
        .getOrCreate()
    )
    yield session
    session.stop()


@pytest.fixture(scope="session")
def ray_cluster(engine_faults: Path) -> Any:
    """One local Ray cluster for the session (2 CPUs, no dashboard)."""
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 1024 * 1024,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()
