#!/usr/bin/env python3
"""Runs a command beside throwaway PostgreSQL and/or SeaweedFS servers (the test suite's, from
tests/servers.py), then stops them:

    python scripts/servers.py --postgres --seaweed -- python bench/run.py ...

The command gets each server's online_store fields (JSON, as in feature_store.yaml) in
FEAST_ICEBERG_ONLINE_STORE_POSTGRES (SQL catalog; add a `warehouse`) and
FEAST_ICEBERG_ONLINE_STORE_REST_S3 (REST catalog, tables on S3). Credentials travel only in
the environment of the command, never on the terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

# servers.py lives with the tests, which import it as a top-level module.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import servers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", action="store_true", help="start PostgreSQL")
    parser.add_argument("--seaweed", action="store_true", help="start SeaweedFS (S3 + REST)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- command [args...]")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or not (args.postgres or args.seaweed):
        parser.error("give --postgres and/or --seaweed, then -- and a command")
    env = dict(os.environ)
    with ExitStack() as stack:
        if args.postgres:
            pg = servers.start_postgres()
            stack.callback(pg.close)
            env["FEAST_ICEBERG_ONLINE_STORE_POSTGRES"] = json.dumps(
                servers.postgres_online_store(pg)
            )
            print(f"PostgreSQL on 127.0.0.1:{pg.port}", file=sys.stderr)
        if args.seaweed:
            sw = servers.start_seaweed()
            stack.callback(sw.close)
            env["FEAST_ICEBERG_ONLINE_STORE_REST_S3"] = json.dumps(servers.rest_s3_online_store(sw))
            print(f"SeaweedFS: S3 {sw.s3_endpoint}, REST {sw.iceberg_uri}", file=sys.stderr)
        return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main())
