"""The SQL catalog on a real PostgreSQL server: PyIceberg sees our tables, a wrong password is
a typed error that does not show it, and a server outage fails a write cleanly, after which the
table is intact and a retry succeeds."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import pytest
import servers
from conftest import (
    Env,
    driver_key,
    driver_row,
    driver_view,
    expected_values,
    fresh_namespace,
    plain,
    start_server,
)
from feast_iceberg import CatalogError

KEYS = range(100)


def on_postgres(make_env: Callable[..., Env], pg: servers.PostgresServer, **online: Any) -> Env:
    return make_env(**servers.postgres_online_store(pg), namespace=fresh_namespace(), **online)


def test_pyiceberg_sql_catalog_on_the_same_postgres_sees_one_row_per_key(
    make_env: Callable[..., Env], postgres_server: servers.PostgresServer
) -> None:
    from pyiceberg.catalog import load_catalog

    env = on_postgres(make_env, postgres_server, catalog_name="pg_interop")
    view = driver_view()
    env.apply(view)
    for version in range(4):
        env.write(view, [driver_row(i, version) for i in KEYS])

    def catalog(name: str) -> Any:
        # What a user writes: the URI of feature_store.yaml, verbatim, and its catalog_name.
        return load_catalog(
            name,
            type="sql",
            uri=postgres_server.uri("postgresql+psycopg2"),
            warehouse=f"file://{env.repo / 'data' / 'warehouse'}",
        )

    ours = catalog("pg_interop")
    assert ours.list_tables(env.namespace) == [(env.namespace, "test_driver_stats_online")]
    scanned = ours.load_table(f"{env.namespace}.test_driver_stats_online").scan().to_arrow()
    assert sorted(scanned.column("driver_id").to_pylist()) == list(KEYS)
    trips = dict(
        zip(
            scanned.column("driver_id").to_pylist(),
            scanned.column("trips").to_pylist(),
            strict=True,
        )
    )
    assert trips == {i: expected_values(i, 3)["trips"] for i in KEYS}
    # Rows are scoped by catalog name: another name sees none of ours.
    assert not catalog("another_name").table_exists(f"{env.namespace}.test_driver_stats_online")


def test_a_wrong_password_is_a_catalog_error_that_does_not_show_it(
    make_env: Callable[..., Env], postgres_server: servers.PostgresServer
) -> None:
    wrong = "Wr0ng" + secrets.token_hex(8)
    env = make_env(
        uri=postgres_server.uri("postgresql+psycopg2", password=wrong),
        namespace=fresh_namespace(),
    )
    with pytest.raises(CatalogError, match="password authentication failed") as info:
        env.apply(driver_view())
    shown = f"{info.value} {info.value!r} {info.value.args}"
    assert wrong not in shown and postgres_server.password not in shown


@pytest.fixture
def own_postgres(request: pytest.FixtureRequest) -> servers.PostgresServer:
    """A server of this test's own, which it may stop without disturbing the others'."""
    return start_server(request, servers.start_postgres)


def test_a_write_while_postgres_is_down_fails_and_a_retry_after_restart_succeeds(
    make_env: Callable[..., Env], own_postgres: servers.PostgresServer
) -> None:
    env = on_postgres(make_env, own_postgres)
    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(i, 1) for i in KEYS])
    before = env.stats(view)

    own_postgres.stop()
    with pytest.raises(CatalogError) as info:
        env.write(view, [driver_row(i, 2) for i in KEYS])
    assert own_postgres.password not in str(info.value)

    own_postgres.start()
    # Nothing of the failed write is visible: same snapshot, the old values, one row per key.
    assert env.stats(view)["snapshot_id"] == before["snapshot_id"]
    scanned = env.pyiceberg_table(view).scan().to_arrow()
    assert scanned.num_rows == len(KEYS)
    assert set(scanned.column("trips").to_pylist()) == {
        expected_values(i, 1)["trips"] for i in KEYS
    }

    # The same store reconnects: the retry commits, and reads see it.
    env.write(view, [driver_row(i, 2) for i in KEYS])
    for i, (_, feats) in zip(KEYS, env.read(view, [driver_key(i) for i in KEYS]), strict=True):
        assert feats is not None
        assert {k: plain(v) for k, v in feats.items()} == expected_values(i, 2)
    assert env.pyiceberg_table(view).scan().to_arrow().num_rows == len(KEYS)
