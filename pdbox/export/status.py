"""Replica counts the running pdbox's autoscaler settled on.

Read from the control API's status snapshot (docs/CONTROL_API.md):
`autoscaler.roles.<role>.current`. Standard library only: export is an
offline command and must not need the router's HTTP stack.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pdbox import runfolder

TIMEOUT_S = 5.0


class StatusError(Exception):
    """One sentence for the user: why the counts could not be read."""


def fetch_status(folder: Path | None = None, timeout: float = TIMEOUT_S) -> dict[str, Any]:
    try:
        info = runfolder.read(folder)
    except runfolder.NotRunning as exc:
        raise StatusError(f"{exc}; --replicas-from-status needs a running pdbox") from None
    url = info.control_url.rstrip("/") + "/pdbox/v1/status"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {info.token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raise StatusError(
            f"pdbox at {info.control_url} answered {exc.code} to its status request"
        ) from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"cannot reach pdbox at {info.control_url} ({reason})") from None
    except ValueError:
        raise StatusError(f"pdbox at {info.control_url} sent a status that is not JSON") from None


def replicas_from_status(status: dict[str, Any], roles: list[str]) -> dict[str, int]:
    """Per role, the current count; roles the snapshot does not list are left out
    (the export then keeps the profile's count for them)."""
    table = ((status.get("autoscaler") or {}).get("roles")) or {}
    out: dict[str, int] = {}
    for role in roles:
        current = (table.get(role) or {}).get("current")
        if isinstance(current, int) and not isinstance(current, bool) and current >= 0:
            out[role] = current
    return out
