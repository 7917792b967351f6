"""`IcebergRayEngine`: Feast's Ray compute engine with a staged, one-commit output step.

Feast's `RayWriteNode` converts every row to protobuf in the workers and calls
`online_write_batch` per batch, and its `write_to_online_store` logs and drops every
online-store error, so a failed commit is silently lost. This engine keeps Feast's Ray plan
(read, filter, dedup, validation) and replaces only the online write when the online store is
ours: workers tag their Arrow batches (`map_batches(batch_format="pyarrow")`) with each row's
Iceberg bucket, the rows are grouped so that every bucket lands in one task, each task stages
its buckets, and the driver commits them in one snapshot (`feast_iceberg.distributed`). Any
error fails the materialization. Views it does not cover take Feast's path, logged at INFO.

    batch_engine:
      type: feast_iceberg.IcebergRayEngine
      ray_address: ray://head:10001   # as ray.engine's fields
      write_concurrency: 8            # staging tasks; default max_workers, else the CPUs
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Literal

import pyarrow as pa

from ._feast_compat import (
    BaseRegistry,
    DAGFormat,
    DAGValue,
    ExecutionContext,
    MaterializationTask,
    RayComputeEngine,
    RayComputeEngineConfig,
    RayFeatureBuilder,
    RayWriteNode,
    declared_arrow_types,
    ray_materialize_one,
    replace_node_class,
    without_online_write,
)
from .distributed import (
    BUCKET_COLUMN,
    TOKEN_COLUMN,
    StagedWrite,
    attempt_id,
    bucket_count,
    commit_staged_write,
    plan_staged_write,
    stage_task,
    tag_buckets,
    token_batch,
)

logger = logging.getLogger(__name__)


class IcebergRayEngineConfig(RayComputeEngineConfig):
    """`ray.engine`'s `batch_engine:` block under our type name; the same fields.
    `write_concurrency` (else `max_workers`, else the cluster's CPUs, at most the table's
    buckets) is the number of staging tasks."""

    type: Literal["feast_iceberg.IcebergRayEngine", "feast_iceberg.ray_engine.IcebergRayEngine"] = (
        "feast_iceberg.IcebergRayEngine"
    )


def _tag_batch(write: StagedWrite, groups: int, schema: pa.Schema, batch: Any) -> pa.Table:
    return tag_buckets(write, to_arrow(batch, schema), groups)


def to_arrow(frame: Any, schema: pa.Schema) -> pa.Table:
    """A pandas block of Feast's Ray steps as Arrow, in `schema` (the one the driver checked),
    so every block has the same types whatever its nulls. Ray keeps list cells as Python
    objects (its `python_object` extension): those go through Python lists, as Feast's own
    write node's `Table.from_pandas` sees them."""
    arrays = []
    for field in schema:
        column = frame[field.name]
        try:
            arrays.append(pa.array(column, type=field.type, from_pandas=True))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, TypeError):
            arrays.append(pa.array(column.tolist(), type=field.type, from_pandas=True))
    return pa.Table.from_arrays(arrays, schema=schema)


def _stage_group(write: StagedWrite, group: pa.Table) -> pa.Table:
    import ray

    first = group.column(BUCKET_COLUMN)[0].as_py() if group.num_rows else "empty"
    attempt = attempt_id(f"g{first}", ray.get_runtime_context().get_task_id() or "driver")
    token = stage_task(write, group.to_batches(), attempt)
    return pa.Table.from_batches([token_batch(token)])


def stage_with_ray(
    dataset: Any,
    write: StagedWrite,
    groups: int,
    schema: pa.Schema,
    task_options: dict[str, Any] | None = None,
) -> list[bytes]:
    """Stages every row of `dataset` (a Ray dataset): converted to `schema` and bucket-tagged
    block by block, grouped by bucket modulo `groups` (each group holds whole buckets and is
    staged by one call), the tokens gathered on the driver. A task that fails raises here
    after Ray's retries. `task_options` (Feast's `worker_task_options`) go to every task."""
    options = dict(task_options or {})
    tagged = dataset.map_batches(
        functools.partial(_tag_batch, write, groups, schema), batch_format="pandas", **options
    )
    staged = tagged.groupby(BUCKET_COLUMN).map_groups(
        functools.partial(_stage_group, write), batch_format="pyarrow", **options
    )
    return [row[TOKEN_COLUMN] for row in staged.take_all()]


def _parallelism(config: Any) -> int:
    for name in ("write_concurrency", "max_workers"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


class IcebergRayWriteNode(RayWriteNode):
    """`RayWriteNode` whose online write is staged and committed once when the store is
    ours; the offline write is Feast's. Adds no state: Feast's plan builds `RayWriteNode`s
    and `replace_node_class` makes them this class."""

    feature_view: Any

    def execute(self, context: ExecutionContext) -> Any:
        dataset = self.get_single_input_value(context).data
        schema = _arrow_schema(dataset, self.feature_view)
        write = None if schema is None else plan_staged_write(context, self.feature_view, schema)
        if write is None:
            return super().execute(context)
        groups = min(bucket_count(context, write), _parallelism(self.config))
        report = commit_staged_write(
            context,
            write,
            lambda: stage_with_ray(
                dataset, write, groups, schema, getattr(self.config, "worker_task_options", None)
            ),
        )
        if getattr(self.feature_view, "offline", False):
            self._write_offline(context)
        return DAGValue(
            data=dataset,
            format=DAGFormat.RAY,
            metadata={
                "written": True,
                "feature_view": self.feature_view.name,
                "online": True,
                "offline": getattr(self.feature_view, "offline", False),
                "feast_iceberg": report,
            },
        )

    def _write_offline(self, context: ExecutionContext) -> None:
        """Feast's own offline half of the write, with the online half switched off."""
        view: Any = self.feature_view
        self.feature_view = without_online_write(view)
        try:
            super().execute(context)
        finally:
            self.feature_view = view


def _arrow_schema(dataset: Any, view: Any, sample_rows: int = 1024) -> pa.Schema | None:
    """The Arrow schema the staged write converts every block to: the view's declared Arrow
    types for its join keys and features (Feast's own type map), the first rows' for the
    other columns (timestamps). None when the dataset has no rows."""
    try:
        sample = dataset.take_batch(sample_rows, batch_format="pandas")
    except ValueError:  # Ray: "The dataset is empty."
        return None
    if len(sample) == 0:
        return None
    schema = pa.Schema.from_pandas(sample, preserve_index=False)
    for name, arrow_type in declared_arrow_types(view).items():
        index = schema.get_field_index(name)
        if index >= 0:
            schema = schema.set(index, pa.field(name, arrow_type))
    return schema


class _IcebergRayFeatureBuilder(RayFeatureBuilder):
    def build(self) -> Any:
        return replace_node_class(super().build(), RayWriteNode, IcebergRayWriteNode)


class IcebergRayEngine(RayComputeEngine):
    """Feast's Ray compute engine; materialization into feast-iceberg stages every bucket in
    Ray tasks and commits each feature view once."""

    def _materialize_one(
        self,
        registry: BaseRegistry,
        task: MaterializationTask,
        from_offline_store: bool = False,
        **kwargs: Any,
    ) -> Any:
        if from_offline_store:
            logger.info(
                "feast-iceberg: %s takes Feast's legacy Ray path (from_offline_store)",
                task.feature_view.name,
            )
            return super()._materialize_one(registry, task, from_offline_store=True, **kwargs)
        return ray_materialize_one(self, registry, task, _IcebergRayFeatureBuilder)


__all__ = [
    "IcebergRayEngine",
    "IcebergRayEngineConfig",
    "IcebergRayWriteNode",
    "stage_with_ray",
    "to_arrow",
]
