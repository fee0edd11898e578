"""Moving a running stream by its KV cache instead of recomputing it (flowing decode).

A stream that leaves a live worker (to rebalance, or to make room) has its
blocks in that worker's prefix cache: the prompt and the tokens generated so
far. So the move asks the old worker for a one-token prefill leg of the
continuation (``do_remote_decode``): it finds all but the last partial block
cached and computes at most about one block, then holds the blocks for a
puller. The new worker gets the continuation with the returned
``kv_transfer_params`` and pulls the blocks over NIXL (TaiChi's "flowing
decode", arXiv 2508.01989, done with vLLM's own P/D protocol). If the leg
fails, the continuation still goes, and the new worker recomputes the prompt
as a move after a crash does.

`Handoff` is what one move cost: the tokens the old worker computed for it,
the tokens the new one was offered by KV, the milliseconds of the leg.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

from pdbox.router.pd import PrefillFailed, prefill_leg


@dataclass
class Handoff:
    ok: bool
    leg_ms: float
    # Tokens of the continuation's prompt the old worker holds for the puller.
    kv_tokens: int = 0
    # Of them, those it had to compute for the leg (the rest were in its cache).
    computed_on_old: int = 0
    error: str = ""  # why the leg failed (then the new worker recomputes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def handoff(session: aiohttp.ClientSession, url: str, path: str,
                  body: dict[str, Any], request_id: str,
                  timeout_s: float) -> tuple[dict[str, Any] | None, Handoff]:
    """The one-token leg on the old worker; (kv_transfer_params or None, what it cost)."""
    t0 = time.monotonic()
    try:
        params = await prefill_leg(session, url, path, body, request_id, timeout_s)
    except PrefillFailed as exc:
        return None, Handoff(False, 1000 * (time.monotonic() - t0), error=str(exc))
    ms = 1000 * (time.monotonic() - t0)
    total = _int(params.get("remote_num_tokens"))
    cached = _int(params.get("remote_prefill_cached_tokens"))
    return params, Handoff(True, ms, kv_tokens=total, computed_on_old=max(0, total - cached))


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0
