"""`IcebergArrowEngine`: Feast's local compute engine with an Arrow-native output step.

Feast's local engine ends every materialization with `LocalOutputNode`, which converts the
offline-store result to one protobuf per value (`_convert_arrow_to_proto`, ~6 s per 100k rows,
and only the first chunk of a multi-chunk table) before `online_write_batch` sees it. This engine
keeps everything Feast does before that step (offline read, field mapping, filters, dedup,
validation) and replaces only the output step: when the online store is ours, the Arrow table goes
to Rust through the Arrow PyCapsule interface, is converted column by column to the table's types
and upserted in chunks of `chunk_rows` rows, one snapshot each. Anything it does not cover (other
online stores, on-demand views, set/map/json/struct features, Arrow types without an exact
conversion) takes Feast's own proto path, unchanged.

    batch_engine:
      type: feast_iceberg.IcebergArrowEngine
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from feast.repo_config import FeastConfigBaseModel
from pydantic import Field, StrictStr

from . import _internal
from ._feast_compat import (
    ArrowTableValue,
    BaseRegistry,
    ExecutionContext,
    LocalComputeEngine,
    LocalFeatureBuilder,
    LocalMaterializationJob,
    LocalOutputNode,
    MaterializationTask,
    materialize_one,
    online_write_batch_size,
    validate_vector_widths,
)
from .online_store import IcebergOnlineStore, key_names, table_name

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 1_000_000


class IcebergArrowEngineConfig(FeastConfigBaseModel):
    """The `batch_engine:` block selecting the Arrow-native materialization engine."""

    type: Literal["feast_iceberg.IcebergArrowEngine", "feast_iceberg.engine.IcebergArrowEngine"] = (
        "feast_iceberg.IcebergArrowEngine"
    )

    backend: StrictStr | None = None
    """DataFrame backend of Feast's local engine steps (`pandas`, `polars`); as `local`'s."""

    chunk_rows: int = Field(default=DEFAULT_CHUNK_ROWS, ge=1)
    """Rows per committed snapshot: the write path holds one chunk in memory at a time."""


def source_columns(feature_view: Any) -> dict[str, Any] | None:
    """Where the view's table columns are in the offline result, named as Feast's proto path
    names them (after the source's field mapping, which Feast's read step has applied); None
    for views only the proto path handles."""
    # On-demand views are recognised by these attributes, as Feast does (no circular import).
    if (
        getattr(feature_view, "source_request_sources", None) is not None
        or getattr(feature_view, "source_feature_view_projections", None) is not None
    ):
        return None
    source = getattr(feature_view, "batch_source", None)
    if source is None:
        return None
    keys = key_names(feature_view)
    return {
        "join_keys": [(c.name, c.name) for c in feature_view.entity_columns],
        # A join key listed among the features too (Feast's registry does that for stream
        # views) is a key column, never a feature column.
        "features": [(f.name, f.name) for f in feature_view.features if f.name not in keys],
        "event_ts": source.timestamp_field,
        "created_ts": source.created_timestamp_column or None,
    }


class ArrowOutputNode(LocalOutputNode):
    """`LocalOutputNode` whose online write skips per-row protos when the store is ours."""

    def __init__(self, name: str, feature_view: Any, chunk_rows: int, inputs: Any = None) -> None:
        super().__init__(name, feature_view, inputs=inputs)
        self.chunk_rows = chunk_rows

    def execute(self, context: ExecutionContext) -> ArrowTableValue:
        table = self.get_single_table(context).data
        if not self._write_natively(context, table):
            return super().execute(context)
        output = ArrowTableValue(data=table)
        context.node_outputs[self.name] = output
        # The offline half of Feast's output step, as LocalOutputNode does it.
        if self.feature_view.offline:
            context.offline_store.offline_write_batch(
                config=context.repo_config,
                feature_view=self.feature_view,
                table=table,
                progress=lambda x: None,
            )
        return output

    def _write_natively(self, context: ExecutionContext, table: Any) -> bool:
        """Writes the online half natively; False (nothing written) when Feast's path must."""
        online = context.online_store
        view = self.feature_view
        if table.num_rows == 0 or not view.online or not isinstance(online, IcebergOnlineStore):
            return False
        columns = source_columns(view)
        if columns is None:
            logger.info("feast-iceberg: %s takes Feast's proto path: no batch source", view.name)
            return False
        # What Feast's proto path checks before converting, the native path checks too.
        validate_vector_widths(table, view)
        store = online._store(context.repo_config)
        name = table_name(context.repo_config, view)
        why = _internal.check_arrow(store, name, table.schema, **columns)
        if why is not None:
            logger.info("feast-iceberg: %s takes Feast's proto path: %s", view.name, why)
            return False
        # Feast's `materialization_config.online_write_batch_size` caps the rows per write, as
        # in its own output step; within it, `chunk_rows` does.
        batch_size = online_write_batch_size(context.repo_config)
        chunk_rows = min(self.chunk_rows, batch_size) if batch_size else self.chunk_rows
        report = _internal.write_arrow(store, name, table, chunk_rows=chunk_rows, **columns)
        logger.debug("feast-iceberg wrote %s natively: %s", view.name, report)
        return True


class _ArrowFeatureBuilder(LocalFeatureBuilder):
    def __init__(self, registry: BaseRegistry, task: Any, backend: Any, chunk_rows: int) -> None:
        super().__init__(registry, task, backend=backend)
        self.chunk_rows = chunk_rows

    def build_output_nodes(self, view: Any, input_node: Any) -> ArrowOutputNode:
        node = ArrowOutputNode("output", self.dag_root.view, self.chunk_rows, inputs=[input_node])
        self.nodes.append(node)
        return node


class IcebergArrowEngine(LocalComputeEngine):
    """Feast's local compute engine; materialization into feast-iceberg skips per-row protos."""

    def __init__(self, chunk_rows: int = DEFAULT_CHUNK_ROWS, **kwargs: Any) -> None:
        # Feast hands the engine the raw `batch_engine:` mapping; validate our part of it.
        settings = {k: kwargs[k] for k in ("type", "backend") if k in kwargs}
        self.config = IcebergArrowEngineConfig(chunk_rows=chunk_rows, **settings)
        kwargs.pop("type", None)
        super().__init__(**kwargs)

    def _materialize_one(
        self, registry: BaseRegistry, task: MaterializationTask, **kwargs: Any
    ) -> LocalMaterializationJob:
        def builder(registry: BaseRegistry, task: Any, backend: Any) -> _ArrowFeatureBuilder:
            return _ArrowFeatureBuilder(registry, task, backend, self.config.chunk_rows)

        return materialize_one(self, registry, task, builder)


__all__ = ["ArrowOutputNode", "IcebergArrowEngine", "IcebergArrowEngineConfig", "source_columns"]
