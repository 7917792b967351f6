"""Keep secrets out of reprs, logs and error messages."""

from __future__ import annotations

import re
from collections.abc import Mapping

_SECRET_KEY = re.compile(r"(secret|password|token|credential|session|key-id|access-key)", re.I)
_URI_PASSWORD = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@]*):(?P<pw>[^@/]*)@", re.I
)

REDACTED = "***"


def redact_uri(uri: str) -> str:
    """`postgresql://u:pw@h/db` -> `postgresql://u:***@h/db`."""
    return _URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", uri)


def redact_mapping(options: Mapping[str, str]) -> dict[str, str]:
    return {k: (REDACTED if _SECRET_KEY.search(k) else v) for k, v in options.items()}
