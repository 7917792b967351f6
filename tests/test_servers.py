"""The test servers themselves (tests/servers.py): SeaweedFS serves an Iceberg REST catalog and
S3 that PyIceberg can use with the rest-s3 backend's online_store fields, its ordinary bucket
holds an SQL catalog's warehouse, every server listens on 127.0.0.1 only, and a server that
cannot be installed skips, or fails under FEAST_ICEBERG_REQUIRE_SERVERS=1."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import servers
from conftest import Env, pyiceberg_catalog, start_server

SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string())])
ROWS = pa.table({"id": [1, 2, 3], "name": ["a", "b", "c"]}, schema=SCHEMA)


@pytest.mark.parametrize("backend", ["rest-s3"], indirect=True)
def test_rest_s3_backend_config_serves_pyiceberg(env: Env) -> None:
    """What the rest-s3 backend hands our store, PyIceberg can use as is: create, append and
    read back a table in the REST catalog with its data on S3."""
    catalog = pyiceberg_catalog(env.config)
    catalog.create_namespace(env.namespace)
    table = catalog.create_table(f"{env.namespace}.fixture_check", schema=SCHEMA)
    table.append(ROWS)
    again = catalog.load_table(f"{env.namespace}.fixture_check")
    assert again.location().startswith("s3://warehouse/")
    assert again.scan().to_arrow().sort_by("id").equals(ROWS)


def test_rest_catalog_refuses_a_wrong_secret(seaweed_server: servers.SeaweedServer) -> None:
    from pyiceberg.catalog import load_catalog
    from pyiceberg.exceptions import OAuthError

    with pytest.raises(OAuthError, match="invalid_client"):
        load_catalog(
            "wrong",
            type="rest",
            uri=seaweed_server.iceberg_uri,
            **{
                **seaweed_server.rest_options(),
                "credential": f"{seaweed_server.access_key}:not-the-secret",
            },
        )


def test_ordinary_bucket_holds_an_sql_catalog_warehouse(
    seaweed_server: servers.SeaweedServer, tmp_path: Path
) -> None:
    """The table bucket only takes the REST catalog's layout; SQL catalogs put their
    warehouse in the ordinary bucket."""
    from pyiceberg.catalog import load_catalog

    catalog = load_catalog(
        "sql_on_s3",
        type="sql",
        uri=f"sqlite:///{tmp_path / 'catalog.db'}",
        warehouse=f"s3://{seaweed_server.bucket}/{tmp_path.name}",
        **seaweed_server.s3_options(),
    )
    catalog.create_namespace("ns")
    catalog.create_table("ns.t", schema=SCHEMA).append(ROWS)
    table = catalog.load_table("ns.t")
    assert table.location() == f"s3://{seaweed_server.bucket}/{tmp_path.name}/ns/t"
    assert table.scan().to_arrow().sort_by("id").equals(ROWS)


def _listening_addresses(ports: set[int]) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets listening on `ports`, from the kernel's tables."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.rsplit(":", 1)
            if state == "0A" and int(port, 16) in ports:  # 0A: LISTEN
                found.add((address, int(port, 16)))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux's /proc/net")
def test_servers_listen_on_loopback_only(
    postgres_server: servers.PostgresServer, seaweed_server: servers.SeaweedServer
) -> None:
    weed_ports = set(seaweed_server.ports.values())
    weed_ports |= {p + servers.GRPC_OFFSET for p in weed_ports} - {
        seaweed_server.ports["iceberg"] + servers.GRPC_OFFSET  # the REST catalog has no gRPC
    }
    ports = weed_ports | {postgres_server.port}
    listening = _listening_addresses(ports)
    assert {port for _, port in listening} == ports
    loopback = "0100007F"  # 127.0.0.1 as /proc/net/tcp prints it
    assert {address for address, _ in listening} == {loopback}


def test_an_uninstallable_server_skips_or_fails_when_required(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable() -> servers.PostgresServer:
        raise servers.ServerUnavailable("no way to install it here")

    monkeypatch.delenv("FEAST_ICEBERG_REQUIRE_SERVERS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no way to install it here"):
        start_server(request, unavailable)
    monkeypatch.setenv("FEAST_ICEBERG_REQUIRE_SERVERS", "1")
    with pytest.raises(pytest.fail.Exception, match="no way to install it here"):
        start_server(request, unavailable)
