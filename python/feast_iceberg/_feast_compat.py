"""Every use of Feast internals (anything outside Feast's documented `OnlineStore` and
`FeatureStore` interfaces) in one place.

The package is pinned to the Feast minor release these were checked against (pyproject.toml);
`tests/test_feast_compat.py` holds one test per name here that fails when Feast changes it.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
from dataclasses import dataclass
from typing import Any

from feast import utils as feast_utils
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
from feast.utils import _validate_vector_field_lengths

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


class ViewReadHooks(OnlineStore):
    """Feast's `get_online_features` and `get_online_features_async` read every feature view
    of a request through one hook, which a store may override "to batch reads more
    efficiently". A store derived from this class gets the request in `read_views`; when that
    returns False, Feast's own hook (one `online_read` per view) serves it."""

    def read_views(self, request: ViewsRequest) -> bool:
        return False

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


def table_entity_values(
    feature_view: Any, entity_name_to_join_key_map: dict[str, str], join_key_values: dict
) -> dict[str, list[Any]]:
    """The request's join-key columns a view's entity key is made of, under the view's own
    join-key names (a projection may alias them); the lists are the request's own objects."""
    return dict(
        feast_utils._get_table_entity_values(
            feature_view, entity_name_to_join_key_map, join_key_values
        )
    )


def track_feature_statuses(view_name: str, present: int, not_found: int) -> None:
    """Feast's per-view PRESENT / NOT_FOUND counters (a no-op unless its metrics are on);
    like Feast's own read path, never lets a metrics failure fail the read."""
    try:
        from feast.metrics import track_feature_statuses as track

        track(view_name, present, not_found)
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
    "SupportedAsyncMethods",
    "ViewReadHooks",
    "ViewsRequest",
    "declared_arrow_types",
    "is_precomputed_view",
    "materialize_one",
    "ray_materialize_one",
    "replace_node_class",
    "spark_materialize_one",
    "online_write_batch_size",
    "table_entity_values",
    "track_feature_statuses",
    "validate_vector_widths",
    "versioned_name",
    "versioning_enabled",
    "without_online_write",
]
