"""The REST catalog + S3 path against a real SeaweedFS: the commit protocol's failure cases
(answers lost, 5xx after the commit landed, 401, server down), credentials that must not leak,
multi-level namespaces, and other engines (PyIceberg, DuckDB) reading our tables over S3.

Faults are injected by a small HTTP proxy between the store and the catalog: it forwards every
request unchanged unless a test arms one fault.
"""

from __future__ import annotations

import http.server
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import servers
from conftest import Env, driver_key, driver_row, driver_view, expected_values, plain, repo_config
from feast_iceberg import IcebergOnlineStore
from feast_iceberg.exceptions import CatalogError
from feast_iceberg.online_store import table_name
from test_interop import duckdb_with_iceberg

N = 200


class CatalogProxy:
    """Forwards to `upstream`. `fault` (set by a test, consumed once) is one of:
    - "answer-502": forward a commit, then answer 502 as if a gateway lost the answer;
    - "reject-503": answer 503 to a commit without forwarding it;
    - "unauthorized": answer the next non-token request 401 without forwarding;
    and `down = True` drops every connection without an answer until cleared."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.fault: str | None = None
        self.down = False
        self.commits_forwarded = 0
        self.token_requests = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.down:
                    self.close_connection = True
                    return
                is_token = self.path.endswith("/oauth/tokens")
                is_commit = self.command == "POST" and "/tables/" in self.path
                if is_token:
                    proxy.token_requests += 1
                elif proxy.fault == "unauthorized":
                    proxy.fault = None
                    return self._reply(401, {"error": {"message": "expired", "code": 401}})
                if is_commit and proxy.fault == "reject-503":
                    proxy.fault = None
                    return self._reply(503, {"error": {"message": "busy", "code": 503}})
                status, payload, ctype = proxy.forward(self.command, self.path, body, self.headers)
                if is_commit:
                    proxy.commits_forwarded += 1
                    if proxy.fault == "answer-502":
                        proxy.fault = None
                        return self._reply(502, {"error": {"message": "lost", "code": 502}})
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _reply(self, status: int, doc: dict[str, Any]) -> None:
                payload = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer((servers.HOST, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def uri(self) -> str:
        return f"http://{servers.HOST}:{self.server.server_address[1]}"

    def forward(self, method: str, path: str, body: bytes, headers: Any) -> tuple[int, bytes, str]:
        keep = {k: v for k, v in headers.items() if k.lower() in ("authorization", "content-type")}
        request = urllib.request.Request(
            self.upstream + path, data=body or None, method=method, headers=keep
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, r.read(), r.headers.get("Content-Type", "application/json")
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers.get("Content-Type", "application/json")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(seaweed_server: servers.SeaweedServer) -> Iterator[CatalogProxy]:
    p = CatalogProxy(seaweed_server.iceberg_uri)
    yield p
    p.close()


def rest_env(tmp_path: Path, sw: servers.SeaweedServer, name: str, **online: Any) -> Env:
    from conftest import fresh_namespace

    repo = tmp_path / name
    (repo / "data").mkdir(parents=True)
    options = {**servers.rest_s3_online_store(sw), "namespace": fresh_namespace(), **online}
    return Env(repo, repo_config(repo, **options), IcebergOnlineStore(), options)


def through(proxy: CatalogProxy, sw: servers.SeaweedServer) -> dict[str, Any]:
    """online_store fields that send catalog calls through `proxy` (tokens too)."""
    return {
        "uri": proxy.uri,
        "storage_options": {
            **sw.rest_options(),
            "oauth2-server-uri": f"{proxy.uri}/v1/oauth/tokens",
        },
    }


def write_version(env: Env, version: int) -> dict[str, Any]:
    view = driver_view()
    rows = [driver_row(i, version) for i in range(N)]
    env.write(view, rows)
    return env.stats(view)


def assert_version(env: Env, version: int) -> None:
    view = driver_view()
    got = env.read(view, [driver_key(i) for i in range(N)])
    for i, (_, values) in enumerate(got):
        assert values is not None
        assert {k: plain(v) for k, v in values.items()} == expected_values(i, version)
    table = env.pyiceberg_table(view).scan().to_arrow()
    assert table.num_rows == N
    assert len(set(table.column("entity_key").to_pylist())) == N


def test_commit_answered_502_after_it_landed_counts_once(
    tmp_path: Path, seaweed_server: servers.SeaweedServer, proxy: CatalogProxy
) -> None:
    env = rest_env(tmp_path, seaweed_server, "r", **through(proxy, seaweed_server))
    env.apply(driver_view())
    write_version(env, 1)
    before = proxy.commits_forwarded
    proxy.fault = "answer-502"
    stats = write_version(env, 2)
    # The store reloaded, found its snapshot current, and did not commit it a second time.
    assert proxy.commits_forwarded == before + 1
    assert proxy.fault is None
    table = env.pyiceberg_table(driver_view())
    assert table.current_snapshot().snapshot_id == stats["snapshot_id"]
    assert_version(env, 2)


def test_commit_rejected_503_is_retried(
    tmp_path: Path, seaweed_server: servers.SeaweedServer, proxy: CatalogProxy
) -> None:
    env = rest_env(tmp_path, seaweed_server, "r", **through(proxy, seaweed_server))
    env.apply(driver_view())
    write_version(env, 1)
    before = proxy.commits_forwarded
    proxy.fault = "reject-503"
    write_version(env, 2)
    assert proxy.fault is None and proxy.commits_forwarded == before + 1
    assert_version(env, 2)


def test_401_gets_a_fresh_token(
    tmp_path: Path, seaweed_server: servers.SeaweedServer, proxy: CatalogProxy
) -> None:
    env = rest_env(tmp_path, seaweed_server, "r", **through(proxy, seaweed_server))
    env.apply(driver_view())
    tokens = proxy.token_requests
    proxy.fault = "unauthorized"
    write_version(env, 1)
    assert proxy.fault is None
    assert proxy.token_requests == tokens + 1
    assert_version(env, 1)


def test_catalog_down_mid_write_then_back(
    tmp_path: Path, seaweed_server: servers.SeaweedServer, proxy: CatalogProxy
) -> None:
    env = rest_env(tmp_path, seaweed_server, "r", **through(proxy, seaweed_server))
    env.apply(driver_view())
    write_version(env, 1)
    proxy.down = True
    with pytest.raises(CatalogError) as raised:
        write_version(env, 2)
    assert proxy.uri.split("//")[1] in str(raised.value)
    proxy.down = False
    # Nothing half-written: every key still at version 1, one row each; then the retry lands.
    assert_version(env, 1)
    write_version(env, 2)
    assert_version(env, 2)


def test_wrong_credentials_fail_clearly_without_the_secret(
    tmp_path: Path, seaweed_server: servers.SeaweedServer
) -> None:
    secret = "not-the-secret-" + "x" * 12
    options = servers.rest_s3_online_store(seaweed_server)
    options["storage_options"] = {
        **options["storage_options"],
        "credential": f"{seaweed_server.access_key}:{secret}",
    }
    env = rest_env(tmp_path, seaweed_server, "r", **options)
    with pytest.raises(CatalogError) as raised:
        env.apply(driver_view())
    text = f"{raised.value} {raised.value!r} {env.config.online_store!r}"
    assert "credential" in str(raised.value)
    assert secret not in text and seaweed_server.secret_key not in text


def test_multi_level_namespace(tmp_path: Path, seaweed_server: servers.SeaweedServer) -> None:
    from conftest import fresh_namespace

    namespace = f"{fresh_namespace()}.online"
    env = rest_env(tmp_path, seaweed_server, "r", namespace=namespace)
    env.apply(driver_view())
    write_version(env, 1)
    write_version(env, 2)
    assert_version(env, 2)
    assert tuple(namespace.split(".")) in env.catalog().list_namespaces()


def test_duckdb_reads_one_row_per_key_from_s3(
    tmp_path: Path, seaweed_server: servers.SeaweedServer
) -> None:
    env = rest_env(tmp_path, seaweed_server, "r")
    view = driver_view()
    env.apply(view)
    for version in (1, 2, 3):
        write_version(env, version)
    location = env.stats(view)["metadata_location"]
    con = duckdb_with_iceberg(extra=("httpfs",))
    sw = seaweed_server
    con.execute(
        "CREATE SECRET s (TYPE s3, KEY_ID ?, SECRET ?, REGION ?, ENDPOINT ?, URL_STYLE 'path', "
        "USE_SSL false)",
        [sw.access_key, sw.secret_key, sw.region, sw.s3_endpoint.split("//")[1]],
    )
    rows, keys = con.execute(
        "SELECT count(*), count(DISTINCT entity_key) FROM iceberg_scan(?)", [location]
    ).fetchone()
    assert (rows, keys) == (N, N)


def test_static_bearer_token(tmp_path: Path, seaweed_server: servers.SeaweedServer) -> None:
    options = servers.rest_s3_online_store(seaweed_server)
    storage = {k: v for k, v in options["storage_options"].items() if k != "credential"}
    token = seaweed_server.oauth_token()
    options["storage_options"] = {**storage, "token": token}
    env = rest_env(tmp_path, seaweed_server, "r", **options)
    env.apply(driver_view())
    write_version(env, 1)
    assert_version(env, 1)
    assert token not in repr(env.config.online_store)


def test_migrate_is_refused_before_staging_anything(
    tmp_path: Path, seaweed_server: servers.SeaweedServer
) -> None:
    from feast_iceberg.exceptions import ConfigError
    from feast_iceberg.online_store import _column_types
    from test_migrate import KEYS, contrib_rows

    env = rest_env(tmp_path, seaweed_server, "r")
    view = driver_view()
    name = table_name(env.config, view)
    catalog = env.catalog()
    catalog.create_namespace(env.namespace)
    contrib = catalog.create_table(f"{env.namespace}.{name}", schema=contrib_rows(1).schema)
    contrib.append(contrib_rows(1))
    before = catalog.load_table(f"{env.namespace}.{name}").metadata_location
    store = env.store._store(env.config)
    with pytest.raises(ConfigError, match="no metadata-location swap"):
        store.migrate(name, _column_types(view.entity_columns), _column_types(view.features))
    # No staging table left behind (the swap used to be refused only after staging it all),
    # and the contrib table is as it was.
    assert not catalog.table_exists(f"{env.namespace}.{name}__migrating")
    assert [t[-1] for t in catalog.list_tables(env.namespace)] == [name]
    table = catalog.load_table(f"{env.namespace}.{name}")
    assert table.metadata_location == before
    assert table.scan().to_arrow().num_rows == KEYS
