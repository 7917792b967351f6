"""Every use of Feast internals (anything outside Feast's documented `OnlineStore` and
`FeatureStore` interfaces) in one place.

The package is pinned to the Feast minor release these were checked against (pyproject.toml);
`tests/test_feast_compat.py` holds one test per name here that fails when Feast changes it.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, TypeVar

from feast import metrics as feast_metrics
from feast import utils as feast_utils
from feast.feature_service import FeatureService
from feast.infra.common.materialization_job import (
    MaterializationJobStatus,
    MaterializationTask,
)
from feast.infra.compute_engines.dag.context import ExecutionContext
from feast.infra.compute_engines.local.arrow_table_value import ArrowTableValue
from feast.infra.compute_engines.local.compute import LocalComputeEngine
from feast.infra.compute_engines.local.feature_builder import LocalFeatureBuilder
from feast.infra.compute_engines.local.job import LocalMaterializationJob
from feast.infra.compute_engines.local.nodes import LocalOutputNode
from feast.infra.online_stores.helpers import compute_versioned_name
from feast.infra.online_stores.online_store import OnlineStore
from feast.infra.registry.base_registry import BaseRegistry
from feast.infra.supported_async_methods import SupportedAsyncMethods
from feast.online_response import OnlineResponse
from feast.type_map import python_values_to_proto_values
from feast.utils import _validate_vector_field_lengths
from feast.value_type import ValueType

logger = logging.getLogger("feast_iceberg.online_store")

V = TypeVar("V")

PRECOMPUTED_PREFIX = "__precomputed__"
"""Name prefix of the synthetic feature view `OnlineStore.write_precomputed_vector` writes a
feature service's precomputed vectors through (Feast >= 0.64); never passed to `update()`."""


def versioned_name(feature_view: Any, enabled: bool) -> str:
    """The view's name with Feast's `_v{N}` suffix when online versioning is on (the version
    a read asks for through its projection, else the view's current one; none for v0)."""
    return str(compute_versioned_name(feature_view, enabled))


def versioning_enabled(config: Any) -> bool:
    """`registry.enable_online_feature_view_versioning` of a RepoConfig."""
    return bool(getattr(config.registry, "enable_online_feature_view_versioning", False))


def is_precomputed_view(feature_view: Any) -> bool:
    return str(feature_view.name).startswith(PRECOMPUTED_PREFIX)


def online_write_batch_size(config: Any) -> int | None:
    """`materialization_config.online_write_batch_size` of a RepoConfig (None: one batch)."""
    materialization = getattr(config, "materialization_config", None)
    size = getattr(materialization, "online_write_batch_size", None)
    return int(size) if size else None


def validate_vector_widths(table: Any, feature_view: Any) -> None:
    """Feast's check that a vector (vector_index) column has one width, which its proto path
    runs in `_convert_arrow_to_proto`; ValueError when it has not."""
    _validate_vector_field_lengths(table, feature_view)


def materialize_one(
    engine: LocalComputeEngine,
    registry: BaseRegistry,
    task: MaterializationTask,
    builder: Any,
) -> LocalMaterializationJob:
    """`LocalComputeEngine._materialize_one` with another feature builder: Feast builds its
    `LocalFeatureBuilder` inline, so the builder (a callable `(registry, task, backend)`) is
    the one thing swapped. The job carries any error; Feast's caller raises it."""
    job_id = f"{task.feature_view.name}-{task.start_time}-{task.end_time}"
    context = engine.get_execution_context(registry, task)
    try:
        builder(registry, task, engine._get_backend(context)).build().execute(context)
        return LocalMaterializationJob(job_id=job_id, status=MaterializationJobStatus.SUCCEEDED)
    except Exception as e:
        return LocalMaterializationJob(
            job_id=job_id, status=MaterializationJobStatus.ERROR, error=e
        )


# The Spark and Ray engines' modules import pyspark and ray, which are optional extras: their
# names load on first use (`from ._feast_compat import SparkWriteNode` imports pyspark then).
_LAZY = {
    "DAGFormat": "feast.infra.compute_engines.dag.model",
    "DAGValue": "feast.infra.compute_engines.dag.value",
    "SparkComputeEngine": "feast.infra.compute_engines.spark.compute",
    "SparkComputeEngineConfig": "feast.infra.compute_engines.spark.compute",
    "SparkFeatureBuilder": "feast.infra.compute_engines.spark.feature_builder",
    "SparkMaterializationJob": "feast.infra.compute_engines.spark.job",
    "SparkWriteNode": "feast.infra.compute_engines.spark.nodes",
    "RayComputeEngine": "feast.infra.compute_engines.ray.compute",
    "RayComputeEngineConfig": "feast.infra.compute_engines.ray.config",
    "RayFeatureBuilder": "feast.infra.compute_engines.ray.feature_builder",
    "RayMaterializationJob": "feast.infra.compute_engines.ray.job",
    "RayWriteNode": "feast.infra.compute_engines.ray.nodes",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def spark_materialize_one(engine: Any, registry: BaseRegistry, task: Any, builder: Any) -> Any:
    """`SparkComputeEngine._materialize_one` (its DAG path) with another feature builder
    class, built as Feast builds `SparkFeatureBuilder` inline. The job carries any error."""
    job_cls = __getattr__("SparkMaterializationJob")
    job_id = f"{task.feature_view.name}-{task.start_time}-{task.end_time}"
    context = engine.get_execution_context(registry, task)
    spark_session = engine._get_feature_view_spark_session(task.feature_view)
    try:
        plan = builder(registry=registry, spark_session=spark_session, task=task).build()
        plan.execute(context)
        return job_cls(job_id=job_id, status=MaterializationJobStatus.SUCCEEDED)
    except Exception as e:
        return job_cls(job_id=job_id, status=MaterializationJobStatus.ERROR, error=e)


def ray_materialize_one(engine: Any, registry: BaseRegistry, task: Any, builder: Any) -> Any:
    """`RayComputeEngine._materialize_one` (its DAG path) with another feature builder class,
    built as Feast builds `RayFeatureBuilder` inline. The job carries any error."""
    job_cls = __getattr__("RayMaterializationJob")
    job_id = f"{task.feature_view.name}-{task.start_time}-{task.end_time}"
    try:
        context = engine.get_execution_context(registry, task)
        plan = builder(registry, task.feature_view, task, engine.config).build()
        result = plan.execute(context)
        return job_cls(job_id=job_id, status=MaterializationJobStatus.SUCCEEDED, result=result)
    except Exception as e:
        return job_cls(job_id=job_id, status=MaterializationJobStatus.ERROR, error=e)


def replace_node_class(plan: Any, old: type, new: type) -> Any:
    """Makes every node of `plan` that is exactly an `old` a `new` (a subclass adding no
    state): Feast's Ray builder creates its write nodes inline in its materialization plan,
    where no builder method can return another class, and derived views' read nodes hold
    references to them, so the objects stay and only their class changes."""
    for node in plan.nodes:
        if type(node) is old:
            node.__class__ = new
    return plan


def declared_arrow_types(feature_view: Any) -> dict[str, Any]:
    """The Arrow type Feast's type map gives each join key and feature of the view (the
    types its Ray validation step expects), where it has one."""
    from feast.types import from_feast_to_pyarrow_type

    types = {}
    for field in [*feature_view.entity_columns, *feature_view.features]:
        try:
            types[field.name] = from_feast_to_pyarrow_type(field.dtype)
        except (ValueError, KeyError):
            continue
    return types


def without_online_write(feature_view: Any) -> Any:
    """A copy of the view with `online` off, for Feast's write nodes to do only their
    offline half (the online half having been written natively)."""
    view = copy.copy(feature_view)
    view.online = False
    return view


@dataclass
class ViewsRequest:
    """What Feast hands its per-request read hook (`OnlineStore._read_features_per_fv`, Feast
    >= 0.66): the views to read with the features asked of each, the request's join-key
    columns (`{join key: [ValueProto]}`), and the response proto to append to (the join keys
    and request data are in it already; each view adds its feature names and one
    `FeatureVector` per feature, in `grouped_refs` order)."""

    config: Any
    grouped_refs: list[tuple[Any, list[str]]]
    join_key_values: dict[str, list[Any]]
    entity_name_to_join_key_map: dict[str, str]
    response: Any
    full_feature_names: bool
    include_feature_view_version_metadata: bool


@dataclass(frozen=True)
class OnlineRequest:
    """A `get_online_features` request of the shape a store derived from `ViewReadHooks`
    may answer whole (`read_request`): feature views only (no on-demand views, request data,
    entityless views or precomputed vectors), and every entity-row key a join key.

    `context` is Feast's resolution of the requested features, which Feast caches: the same
    object for as long as its registry cache holds, so a store may cache what it derives from
    a request's shape against it. `columns` are the request's join-key columns as the caller
    gave them (native values, or `Value` protos), in entity-row order; `entity_types` Feast's
    value type of each join key; `result_names` the names Feast's response keeps."""

    config: Any
    context: object
    grouped_refs: list[tuple[Any, list[str]]]
    entity_name_to_join_key_map: dict[str, str]
    entity_types: dict[str, ValueType]
    result_names: frozenset[str]
    columns: dict[str, list[Any]]
    full_feature_names: bool
    include_feature_view_version_metadata: bool


class ViewReadHooks(OnlineStore):
    """Two ways in for a store that reads many feature views at once.

    `get_online_features` (and its async twin) hand a request of the shape `OnlineRequest`
    describes to `read_request` before Feast prepares anything (entity values to protos, the
    response's join-key columns, the feature types): a store may answer it whole. Otherwise,
    or when `read_request` returns None, Feast's own method runs, and it reads every feature
    view of the request through one hook, which a store may override "to batch reads more
    efficiently": a store derived from this class gets those in `read_views`; when that
    returns False, Feast's own hook (one `online_read` per view) serves the request."""

    def read_request(self, request: OnlineRequest) -> OnlineResponse | None:
        return None

    def read_views(self, request: ViewsRequest) -> bool:
        return False

    def get_online_features(  # type: ignore[no-untyped-def]
        self,
        config,
        features,
        entity_rows,
        registry,
        project,
        full_feature_names=False,
        include_feature_view_version_metadata=False,
    ) -> OnlineResponse:
        args = (config, features, entity_rows, registry, project, full_feature_names)
        request = online_request(*args, include_feature_view_version_metadata)
        if request is not None:
            started = time.monotonic()
            response = self.read_request(request)
            if response is not None:
                track_online_store_read(time.monotonic() - started)
                return response
        return super().get_online_features(*args, include_feature_view_version_metadata)

    async def get_online_features_async(  # type: ignore[no-untyped-def]
        self,
        config,
        features,
        entity_rows,
        registry,
        project,
        full_feature_names=False,
        include_feature_view_version_metadata=False,
    ) -> OnlineResponse:
        args = (config, features, entity_rows, registry, project, full_feature_names)
        request = online_request(*args, include_feature_view_version_metadata)
        if request is not None:
            started = time.monotonic()
            # The read releases the GIL: in a worker thread it leaves the event loop free.
            response = await asyncio.to_thread(self.read_request, request)
            if response is not None:
                track_online_store_read(time.monotonic() - started)
                return response
        return await super().get_online_features_async(*args, include_feature_view_version_metadata)

    def _read_features_per_fv(  # type: ignore[no-untyped-def]
        self,
        config,
        grouped_refs,
        join_key_values,
        entity_name_to_join_key_map,
        online_features_response,
        full_feature_names,
        include_feature_view_version_metadata,
    ) -> None:
        args = (
            config,
            grouped_refs,
            join_key_values,
            entity_name_to_join_key_map,
            online_features_response,
            full_feature_names,
            include_feature_view_version_metadata,
        )
        if not self.read_views(ViewsRequest(*args)):
            super()._read_features_per_fv(*args)

    async def _read_features_per_fv_async(  # type: ignore[no-untyped-def]
        self,
        config,
        grouped_refs,
        join_key_values,
        entity_name_to_join_key_map,
        online_features_response,
        full_feature_names,
        include_feature_view_version_metadata,
    ) -> None:
        args = (
            config,
            grouped_refs,
            join_key_values,
            entity_name_to_join_key_map,
            online_features_response,
            full_feature_names,
            include_feature_view_version_metadata,
        )
        # The read releases the GIL: in a worker thread it leaves the event loop free.
        if not await asyncio.to_thread(self.read_views, ViewsRequest(*args)):
            await super()._read_features_per_fv_async(*args)


def online_request(
    config: Any,
    features: Any,
    entity_rows: Any,
    registry: Any,
    project: str,
    full_feature_names: bool,
    include_feature_view_version_metadata: bool,
) -> OnlineRequest | None:
    """The request as an `OnlineRequest`, or None (logged at debug level) for a shape Feast's
    own preparation must handle. Feast's errors for malformed entity rows are Feast's: such
    rows are left to it."""
    if isinstance(features, FeatureService) and getattr(features, "precompute_online", False):
        return _not_whole("precomputed feature-service vectors")
    columns = _entity_columns(entity_rows)
    if columns is None:
        return _not_whole("entity rows of another shape")
    context = feast_utils._get_cached_request_context(
        registry, project, features, full_feature_names
    )
    (
        _feature_refs,
        on_demand_views,
        entity_name_to_join_key_map,
        entity_types,
        join_keys,
        grouped_refs,
        result_names,
        needed_request_data,
        entityless,
    ) = context
    if on_demand_views or needed_request_data or entityless or not grouped_refs:
        return _not_whole("on-demand views, request data, entityless views or no views")
    if not columns.keys() <= join_keys:
        return _not_whole("an entity-row key that is not a join key")
    return OnlineRequest(
        config,
        context,
        grouped_refs,
        entity_name_to_join_key_map,
        entity_types,
        result_names,
        columns,
        full_feature_names,
        include_feature_view_version_metadata,
    )


def _entity_columns(entity_rows: Any) -> dict[str, list[Any]] | None:
    """The entity rows as columns, as Feast turns them into columns, when every row has the
    same keys (list of dicts) or every column is a list or tuple of one length."""
    if isinstance(entity_rows, list):
        if not entity_rows or not isinstance(entity_rows[0], Mapping):
            return None
        names = list(entity_rows[0])
        if not names or set(map(len, entity_rows)) != {len(names)}:
            return None
        try:
            return {name: list(map(itemgetter(name), entity_rows)) for name in names}
        except (KeyError, TypeError):
            return None
    if isinstance(entity_rows, Mapping) and entity_rows:
        columns = {k: list(v) for k, v in entity_rows.items() if isinstance(v, (list, tuple))}
        if len(columns) != len(entity_rows) or len(set(map(len, columns.values()))) != 1:
            return None
        return columns if next(iter(columns.values())) else None
    return None


def _not_whole(reason: str) -> OnlineRequest | None:
    logger.debug("Feast prepares this request: %s", reason)
    return None


def entity_values_to_protos(values: list[Any], value_type: ValueType) -> list[Any]:
    """Feast's conversion of a request's entity values to `Value` protos."""
    return python_values_to_proto_values(values, value_type)


def feature_types(grouped_refs: list[tuple[Any, list[str]]]) -> dict[str, ValueType]:
    """The feature types Feast hands `OnlineResponse` for the views of a request."""
    return dict(OnlineStore._build_feature_types(grouped_refs))


def track_online_store_read(seconds: float) -> None:
    """Feast's online-store read latency metric (a no-op unless its metrics are on)."""
    try:
        feast_metrics.track_online_store_read(seconds)
    except Exception:
        pass


def table_entity_values(
    feature_view: Any, entity_name_to_join_key_map: dict[str, str], join_key_values: dict[str, V]
) -> dict[str, V]:
    """The request's join-key columns a view's entity key is made of, under the view's own
    join-key names (a projection may alias them); what the mapping holds for each column
    (values, or an index) comes back as it is."""
    # Feast annotates the columns as `Value` lists; it only passes them through.
    select: Any = feast_utils._get_table_entity_values
    mapped: dict[str, V] = select(feature_view, entity_name_to_join_key_map, join_key_values)
    return mapped


def track_feature_statuses(view_name: str, present: int, not_found: int) -> None:
    """Feast's per-view PRESENT / NOT_FOUND counters (a no-op unless its metrics are on);
    like Feast's own read path, never lets a metrics failure fail the read."""
    try:
        feast_metrics.track_feature_statuses(view_name, present, not_found)
    except Exception:
        pass


__all__ = [
    "PRECOMPUTED_PREFIX",
    "ArrowTableValue",
    "BaseRegistry",
    "ExecutionContext",
    "LocalComputeEngine",
    "LocalFeatureBuilder",
    "LocalMaterializationJob",
    "LocalOutputNode",
    "MaterializationJobStatus",
    "MaterializationTask",
    "OnlineRequest",
    "OnlineResponse",
    "SupportedAsyncMethods",
    "ViewReadHooks",
    "ViewsRequest",
    "declared_arrow_types",
    "entity_values_to_protos",
    "feature_types",
    "is_precomputed_view",
    "materialize_one",
    "online_request",
    "ray_materialize_one",
    "replace_node_class",
    "spark_materialize_one",
    "online_write_batch_size",
    "table_entity_values",
    "track_feature_statuses",
    "track_online_store_read",
    "validate_vector_widths",
    "versioned_name",
    "versioning_enabled",
    "without_online_write",
]
