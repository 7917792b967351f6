"""`IcebergSparkEngine`: Feast's Spark compute engine with a staged, one-commit output step.

Feast's `SparkWriteNode` converts every row to protobuf in the tasks and calls
`online_write_batch` once per Arrow batch (10k rows), each call its own snapshot: 31 commits for
300k rows. This engine keeps Feast's Spark plan (read, filter, dedup, validation) and replaces
only the online write when the online store is ours: tasks tag their Arrow batches
(`mapInArrow`) with each row's Iceberg bucket, the rows are repartitioned by bucket, each task
stages the buckets it owns, and the driver commits all of them in one snapshot
(`feast_iceberg.distributed`). Views it does not cover take Feast's path, logged at INFO.

    batch_engine:
      type: feast_iceberg.IcebergSparkEngine
      partitions: 0          # staging tasks; 0: the cores (defaultParallelism), <= buckets
      spark_conf: {...}      # as spark.engine's
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from ._feast_compat import (
    BaseRegistry,
    DAGFormat,
    DAGValue,
    ExecutionContext,
    MaterializationTask,
    SparkComputeEngine,
    SparkComputeEngineConfig,
    SparkFeatureBuilder,
    SparkWriteNode,
    spark_materialize_one,
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


class IcebergSparkEngineConfig(SparkComputeEngineConfig):
    """`spark.engine`'s `batch_engine:` block under our type name; the same fields.
    `partitions` is the number of staging tasks, each staging whole buckets (0, the default:
    Spark's default parallelism, the cores; never more than the table's buckets)."""

    type: Literal[
        "feast_iceberg.IcebergSparkEngine", "feast_iceberg.spark_engine.IcebergSparkEngine"
    ] = "feast_iceberg.IcebergSparkEngine"


def spark_hash_int(value: int) -> int:
    """Spark's `hash()` of an IntegerType value (Murmur3 x86_32, seed 42), which its
    `repartition(n, column)` takes modulo n to pick a row's partition."""
    mask = 0xFFFFFFFF

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & mask

    k1 = rotl((value & mask) * 0xCC9E2D51 & mask, 15) * 0x1B873593 & mask
    h1 = (rotl(42 ^ k1, 13) * 5 + 0xE6546B64) & mask
    h1 ^= 4
    h1 ^= h1 >> 16
    h1 = h1 * 0x85EBCA6B & mask
    h1 ^= h1 >> 13
    h1 = h1 * 0xC2B2AE35 & mask
    h1 ^= h1 >> 16
    return h1 - (1 << 32) if h1 & 0x80000000 else h1


def partition_tags(partitions: int) -> list[int]:
    """For each partition p < `partitions`, an integer that Spark's hash repartition into
    `partitions` partitions sends to p: tagging the rows of bucket b with the tag of
    b % partitions spreads the buckets evenly, every bucket in one task. (Were Spark to hash
    otherwise, each bucket would still land in one task, only less evenly.)"""
    tags: dict[int, int] = {}
    value = 0
    while len(tags) < partitions:
        tags.setdefault(spark_hash_int(value) % partitions, value)
        value += 1
    return [tags[p] for p in range(partitions)]


def _tag_partition(
    write: StagedWrite, tags: list[int], batches: Iterator[pa.RecordBatch]
) -> Iterator[Any]:
    table = pa.array(tags, pa.int32())
    for batch in batches:
        tagged = tag_buckets(write, batch, len(tags))
        index = tagged.num_columns - 1
        yield tagged.set_column(index, BUCKET_COLUMN, pc.take(table, tagged.column(index)))


def _stage_partition(write: StagedWrite, batches: Iterator[pa.RecordBatch]) -> Iterator[Any]:
    from pyspark import TaskContext

    task = TaskContext.get()
    assert task is not None, "not in a Spark task"
    attempt = attempt_id(
        f"p{task.partitionId()}", f"a{task.attemptNumber()}", f"t{task.taskAttemptId()}"
    )
    yield token_batch(stage_task(write, batches, attempt))


def stage_with_spark(df: Any, write: StagedWrite, partitions: int) -> list[bytes]:
    """Stages every row of `df` (a Spark DataFrame): bucket-tagged in its own partitions,
    hash-repartitioned on the tag into `partitions` tasks (each bucket in exactly one), staged
    per task. A retried or speculative attempt stages under its own attempt id; the tokens
    collected are those of the one attempt per partition that Spark counted."""
    from pyspark.sql.types import BinaryType, IntegerType, StructField, StructType

    tagged_schema = StructType([*df.schema.fields, StructField(BUCKET_COLUMN, IntegerType())])
    token_schema = StructType([StructField(TOKEN_COLUMN, BinaryType())])
    tag = functools.partial(_tag_partition, write, partition_tags(partitions))
    staged = (
        df.mapInArrow(tag, tagged_schema)
        .repartition(partitions, BUCKET_COLUMN)
        .mapInArrow(functools.partial(_stage_partition, write), token_schema)
    )
    return [row[TOKEN_COLUMN] for row in staged.collect()]


class IcebergSparkWriteNode(SparkWriteNode):
    """`SparkWriteNode` whose online write is staged and committed once when the store is
    ours; the offline write is Feast's."""

    feature_view: Any

    def __init__(self, name: str, feature_view: Any, partitions: int, inputs: Any = None) -> None:
        super().__init__(name, feature_view, inputs=inputs)
        self.partitions = partitions

    def execute(self, context: ExecutionContext) -> Any:
        df = self.get_single_input_value(context).data
        write = self._plan(context, df)
        if write is None:
            return super().execute(context)
        partitions = min(self.partitions or _cores(df), bucket_count(context, write))
        report = commit_staged_write(
            context, write, lambda: stage_with_spark(df, write, partitions)
        )
        if self.feature_view.offline:
            self._write_offline(context)
        return DAGValue(
            data=df,
            format=DAGFormat.SPARK,
            metadata={
                "feature_view": self.feature_view.name,
                "write_to_online": True,
                "write_to_offline": self.feature_view.offline,
                "feast_iceberg": report,
            },
        )

    def _plan(self, context: ExecutionContext, df: Any) -> StagedWrite | None:
        from pyspark.sql.pandas.types import to_arrow_schema

        schema = to_arrow_schema(df.schema)
        return plan_staged_write(context, self.feature_view, schema)

    def _write_offline(self, context: ExecutionContext) -> None:
        """Feast's own offline half of the output step, with the online half switched off."""
        view: Any = self.feature_view
        self.feature_view = without_online_write(view)
        try:
            super().execute(context)
        finally:
            self.feature_view = view


def _cores(df: Any) -> int:
    """Spark's default parallelism (the cluster's cores); a Spark Connect session has no
    SparkContext to ask, so its staging tasks default to its shuffle partitions."""
    session = df.sparkSession
    try:
        return max(1, int(session.sparkContext.defaultParallelism))
    except Exception:
        return max(1, int(session.conf.get("spark.sql.shuffle.partitions", "200")))


class _IcebergSparkFeatureBuilder(SparkFeatureBuilder):
    partitions = 0

    def build_output_nodes(self, view: Any, input_node: Any) -> IcebergSparkWriteNode:
        node = IcebergSparkWriteNode(
            f"{view.name}:output", self.dag_root.view, self.partitions, inputs=[input_node]
        )
        self.nodes.append(node)
        return node


class IcebergSparkEngine(SparkComputeEngine):
    """Feast's Spark compute engine; materialization into feast-iceberg stages every bucket
    in the Spark tasks and commits each feature view once."""

    def _materialize_one(
        self,
        registry: BaseRegistry,
        task: MaterializationTask,
        from_offline_store: bool = False,
        **kwargs: Any,
    ) -> Any:
        if from_offline_store:
            logger.info(
                "feast-iceberg: %s takes Feast's legacy Spark path (from_offline_store)",
                task.feature_view.name,
            )
            return super()._materialize_one(registry, task, from_offline_store=True, **kwargs)
        partitions = int(getattr(self.repo_config.batch_engine, "partitions", 0) or 0)

        def builder(**args: Any) -> _IcebergSparkFeatureBuilder:
            built = _IcebergSparkFeatureBuilder(**args)
            built.partitions = partitions
            return built

        return spark_materialize_one(self, registry, task, builder)


__all__ = [
    "IcebergSparkEngine",
    "IcebergSparkEngineConfig",
    "IcebergSparkWriteNode",
    "partition_tags",
    "spark_hash_int",
    "stage_with_spark",
]
