"""Concurrent writers in separate processes never lose an update, and a store used before a
fork keeps working in the child."""

from __future__ import annotations

import multiprocessing
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    BASE_TS,
    Backend,
    Env,
    driver_key,
    driver_row,
    driver_view,
    expected_values,
    plain,
    repo_config,
)

WRITERS = 4
BATCHES = 20
OWN_KEYS = 40
SHARED_KEYS = range(100_000, 100_040)

pytestmark = pytest.mark.backends


def own_keys(writer: int) -> range:
    return range(writer * 1000, writer * 1000 + OWN_KEYS)


def writer_process(
    repo: str, online: dict[str, Any], writer: int, start: multiprocessing.synchronize.Barrier
) -> None:
    from feast_iceberg import IcebergOnlineStore

    config = repo_config(Path(repo), **online)
    store = IcebergOnlineStore()
    view = driver_view()
    start.wait()
    for batch in range(BATCHES):
        rows = [driver_row(i, batch) for i in own_keys(writer)]
        # Shared keys: every writer writes them; the newest event time is (batch, writer).
        ts = BASE_TS + timedelta(minutes=batch, seconds=writer)
        rows += [driver_row(i, batch * 10 + writer, ts=ts) for i in SHARED_KEYS]
        store.online_write_batch(config, view, rows, None)


def test_four_writer_processes_lose_no_update(env: Env) -> None:
    view = driver_view()
    env.apply(view)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(WRITERS)
    procs = [
        ctx.Process(target=writer_process, args=(str(env.repo), env.online, w, start))
        for w in range(WRITERS)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * WRITERS

    # Every writer's own keys carry its last batch: an overwrite planned on a stale snapshot
    # would have reverted some of them.
    for w in range(WRITERS):
        keys = list(own_keys(w))
        for i, (_, feats) in zip(keys, env.read(view, [driver_key(i) for i in keys]), strict=True):
            assert feats is not None
            assert {k: plain(v) for k, v in feats.items()} == expected_values(i, BATCHES - 1)
    # Shared keys: the newest event time wins, whoever committed last.
    last = (BATCHES - 1) * 10 + (WRITERS - 1)
    for i, (_, feats) in zip(
        SHARED_KEYS, env.read(view, [driver_key(i) for i in SHARED_KEYS]), strict=True
    ):
        assert feats is not None
        assert {k: plain(v) for k, v in feats.items()} == expected_values(i, last)
    assert env.stats(view)["records"] == WRITERS * OWN_KEYS + len(SHARED_KEYS)
    assert env.pyiceberg_table(view).scan().to_arrow().num_rows == (
        WRITERS * OWN_KEYS + len(SHARED_KEYS)
    )


def _child_reads(queue: multiprocessing.Queue) -> None:
    store, config = _FORKED
    ((_, feats),) = store.online_read(config, driver_view(), [driver_key(5)])
    store.online_write_batch(config, driver_view(), [driver_row(6, 3)], None)
    queue.put(plain(feats["trips"]) if feats else None)


# What the forked child inherits from the test (fork copies memory; nothing is pickled).
_FORKED: list = []


def test_a_store_used_before_fork_works_in_the_child(make_env, backend: Backend) -> None:
    env = make_env(metadata_refresh_seconds=0)
    view = driver_view()
    env.apply(view)
    env.write(view, [driver_row(5, 2)])
    env.read(view, [driver_key(5)])  # the runtime and caches exist before the fork
    _FORKED[:] = [env.store, env.config]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_reads, args=(queue,))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == expected_values(5, 2)["trips"]
    ((_, feats),) = env.read(view, [driver_key(6)])
    assert feats is not None and plain(feats["trips"]) == expected_values(6, 3)["trips"]


def _child_uses_core(queue: multiprocessing.Queue) -> None:
    store, config = _FORKED
    from feast_iceberg.exceptions import ForkError

    try:
        store._store(config).table_exists("anything")  # the parent's core, by hand
        queue.put("used the parent's connections")
    except ForkError as e:
        queue.put(f"{type(e).__name__}: {e}")


def test_a_core_from_before_fork_refuses_to_run_in_the_child(make_env, backend: Backend) -> None:
    env = make_env()
    env.apply(driver_view())
    core = env.store._store(env.config)

    class Pinned:
        """Hands the child the parent's core instead of building its own."""

        def _store(self, _config: Any) -> Any:
            return core

    _FORKED[:] = [Pinned(), env.config]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_uses_core, args=(queue,))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0
    said = queue.get(timeout=5)
    assert said.startswith("ForkError: ") and "fork" in said  # not a ConfigError: config is fine
    # The parent's connections are intact after the child exited and dropped its copy.
    env.write(driver_view(), [driver_row(1, 1)])
    assert env.read(driver_view(), [driver_key(1)])[0][1] is not None
