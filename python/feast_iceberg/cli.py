"""`feast-iceberg`: inspect and maintain the online tables of a Feast repo.

Finds feature_store.yaml like `feast` does (`-c/--chdir`, `-f/--feature-store-yaml`, else the
current directory) and acts on the tables of the repo's feature views (all, or those named).
Expiry of old snapshots and deletion of the files they referenced already run after every
write; these commands are for inspection, explicit runs and clean-up after crashes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from . import _internal
from .config import IcebergOnlineStoreConfig
from .exceptions import ConfigError, FeastIcebergError
from .reports import MigrationReport


@dataclass
class Repo:
    """The repo's config and the core store of its online store."""

    repo_path: Path
    yaml_path: Path | None

    def load(self) -> tuple[Any, _internal.Store]:
        from feast.repo_config import load_repo_config

        yaml = self.yaml_path or self.repo_path / "feature_store.yaml"
        if not yaml.is_file():
            raise click.UsageError(f"no feature_store.yaml at {yaml} (use -c REPO or -f FILE)")
        config = load_repo_config(self.repo_path, yaml)
        online = config.online_store
        if not isinstance(online, IcebergOnlineStoreConfig):
            raise ConfigError(
                f"{yaml}: online_store is {type(online).__name__}, not feast-iceberg's store"
            )
        version = config.entity_key_serialization_version
        return config, _internal.Store(online.to_store_json(self.repo_path, version))

    def tables(self, views: Sequence[str]) -> Iterator[tuple[str, str, _internal.Store, Any]]:
        """(feature view, table, store, config) for the named views, or for every view."""
        from feast import FeatureStore

        from .online_store import table_name

        config, store = self.load()
        fs = FeatureStore(repo_path=str(self.repo_path), fs_yaml_file=self.yaml_path)
        known = {fv.name: fv for fv in fs.list_feature_views()}
        unknown = sorted(set(views) - set(known))
        if unknown:
            raise click.UsageError(f"unknown feature views: {', '.join(unknown)}")
        for name in views or sorted(known):
            yield name, table_name(config, known[name]), store, config


def _emit(rows: list[dict[str, Any]], as_json: bool, columns: Sequence[str]) -> None:
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo("no tables")
        return
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        click.echo(
            "  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths, strict=True))
        )


def _each_table(
    ctx: click.Context,
    views: Sequence[str],
    label: str,
    action: Callable[[str, str, _internal.Store, Any], Mapping[str, Any]],
) -> list[dict[str, Any]]:
    repo: Repo = ctx.obj
    targets = list(repo.tables(views))
    rows = []
    with click.progressbar(targets, label=label, file=click.get_text_stream("stderr")) as bar:
        for view, table, store, config in bar:
            rows.append(
                {"feature_view": view, "table": table, **action(view, table, store, config)}
            )
    return rows


@click.group()
@click.option(
    "--chdir",
    "-c",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run as if in this directory (the Feast repo).",
)
@click.option(
    "--feature-store-yaml",
    "-f",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Path to feature_store.yaml (default: <repo>/feature_store.yaml).",
)
@click.pass_context
def cli(ctx: click.Context, chdir: Path | None, feature_store_yaml: Path | None) -> None:
    """Inspect and maintain feast-iceberg online tables."""
    ctx.obj = Repo((chdir or Path.cwd()).resolve(), feature_store_yaml)


VIEWS = click.argument("views", nargs=-1)
JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
DRY_RUN = click.option("--dry-run", is_flag=True, help="Report what would change; change nothing.")


@cli.command()
@VIEWS
@JSON
@click.pass_context
def stats(ctx: click.Context, views: tuple[str, ...], as_json: bool) -> None:
    """Live rows, files, bytes, snapshots and duplicate keys per table."""

    def one(view: str, table: str, store: _internal.Store, config: Any) -> dict[str, Any]:
        s = store.stats(table)
        online = config.online_store
        return {
            "catalog": online.catalog_name,
            "identifier": f"{online.namespace}.{table}",
            "rows": s["records"],
            "data_files": s["data_files"],
            "delete_files": s["delete_files"],
            "bytes": s["data_bytes"],
            "buckets": s["buckets"],
            "largest_bucket_bytes": s["largest_bucket_bytes"],
            "snapshots": s["snapshots"],
            "metadata_files": s["metadata_log"] + 1,
            "duplicate_keys": store.duplicate_keys(table),
            "metadata_location": s["metadata_location"],
        }

    rows = _each_table(ctx, views, "reading tables", one)
    columns = ["feature_view", "identifier", "rows", "data_files", "delete_files", "bytes",
               "buckets", "snapshots", "metadata_files", "duplicate_keys"]  # fmt: skip
    _emit(rows, as_json, columns)
    if rows and not as_json:
        click.echo(f"catalog name: {rows[0]['catalog']} (readers must use the same name)")


@cli.command("expire-snapshots")
@VIEWS
@DRY_RUN
@JSON
@click.pass_context
def expire_snapshots(
    ctx: click.Context, views: tuple[str, ...], dry_run: bool, as_json: bool
) -> None:
    """Expire snapshots past retention now and delete the files only they referenced."""
    rows = _each_table(
        ctx, views, "expiring",
        lambda _v, table, store, _c: store.expire(table, dry_run=dry_run),
    )  # fmt: skip
    _emit(rows, as_json, ["feature_view", "table", "snapshots_expired"])


@cli.command("remove-orphans")
@VIEWS
@click.option(
    "--older-than",
    type=click.FloatRange(min=0),
    default=3600.0,
    show_default=True,
    help="Seconds: younger unreferenced files may belong to a write in progress and are kept.",
)
@DRY_RUN
@JSON
@click.pass_context
def remove_orphans(
    ctx: click.Context, views: tuple[str, ...], older_than: float, dry_run: bool, as_json: bool
) -> None:
    """Delete files no retained snapshot or metadata version references (e.g. left by a
    writer that crashed)."""
    rows = _each_table(
        ctx, views, "scanning",
        lambda _v, table, store, _c: store.remove_orphans(table, older_than, dry_run=dry_run),
    )  # fmt: skip
    if not as_json:
        for r in rows:
            for path in r.pop("paths"):
                click.echo(f"{'would remove' if dry_run else 'removed'} {path}")
    _emit(rows, as_json, ["feature_view", "table", "files", "bytes", "too_young"])


@cli.command()
@VIEWS
@click.option(
    "--all",
    "all_buckets",
    is_flag=True,
    help="Rewrite every bucket, not only those with several files.",
)
@click.option(
    "--buckets",
    type=click.IntRange(min=1),
    default=None,
    help="Re-bucket into this many buckets (a multiple of the current count), whatever the "
    "size of the buckets.",
)
@DRY_RUN
@JSON
@click.pass_context
def compact(
    ctx: click.Context,
    views: tuple[str, ...],
    all_buckets: bool,
    buckets: int | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Rewrite buckets with several data files into one sorted file each (newest row per key).

    A table whose largest bucket holds more than `target_bucket_bytes` live bytes (or
    `--buckets N`) is re-bucketed instead: its bucket count doubles until the largest bucket
    fits, and every file is rewritten into the new partition spec.
    """
    rows = _each_table(
        ctx, views, "compacting",
        lambda _v, table, store, _c: store.compact(
            table, all=all_buckets, dry_run=dry_run, buckets=buckets
        ),
    )  # fmt: skip
    _emit(rows, as_json, ["feature_view", "table", "buckets_before", "buckets_after", "buckets",
                          "files_removed", "files_added"])  # fmt: skip


@cli.command()
@VIEWS
@DRY_RUN
@JSON
@click.pass_context
def migrate(ctx: click.Context, views: tuple[str, ...], dry_run: bool, as_json: bool) -> None:
    """Convert tables written by Feast's contrib Iceberg store into this store's layout.

    Run it after switching `type:` in feature_store.yaml and before `feast apply`. Each table is
    rebuilt beside the old one (newest row per entity key) and swapped in atomically under the
    same name; the contrib files are left where they were (see previous_metadata).
    """
    from feast import FeatureStore

    from .online_store import _column_types

    repo: Repo = ctx.obj
    fs = FeatureStore(repo_path=str(repo.repo_path), fs_yaml_file=repo.yaml_path)
    views_by_name = {fv.name: fv for fv in fs.list_feature_views()}

    def one(view: str, table: str, store: _internal.Store, _config: Any) -> MigrationReport:
        fv = views_by_name[view]
        return store.migrate(
            table, _column_types(fv.entity_columns), _column_types(fv.features), dry_run=dry_run
        )

    rows = _each_table(ctx, views, "migrating", one)
    _emit(rows, as_json, ["feature_view", "table", "already_migrated", "files_read", "rows_read",
                          "rows_live"])  # fmt: skip


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        raise SystemExit(1) from None
    except click.ClickException as e:
        e.show()
        raise SystemExit(e.exit_code) from None
    except FeastIcebergError as e:
        click.echo(f"error: {type(e).__name__}: {e}", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
