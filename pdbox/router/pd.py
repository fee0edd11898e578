"""The two-leg P/D flow over NIXL (vLLM's NixlConnector protocol).

Leg 1 asks the prefill worker to compute the prompt's KV cache and keep it
for a remote decoder (``do_remote_decode``), generating one token. Its answer
carries ``kv_transfer_params``: the block ids, engine id, host and port.
Leg 2 sends the original request to the decode worker with those params; the
decode worker pulls the blocks over NIXL and goes on generating. Both legs
carry the same X-Request-Id. Timeouts are bounded; any failure of leg 1 is a
PrefillFailed, which the router answers by prefilling on the decode worker.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

PREFILL_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


class PrefillFailed(Exception):
    """The prefill leg did not give usable kv_transfer_params; str() says why."""


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The request as leg 1 sends it: same prompt, one token, no stream."""
    leg = dict(body)
    leg["max_tokens"] = 1
    if "max_completion_tokens" in leg:
        leg["max_completion_tokens"] = 1
    leg["stream"] = False
    leg.pop("stream_options", None)
    leg["n"] = 1
    leg["kv_transfer_params"] = dict(PREFILL_PARAMS)
    return leg


def decode_body(body: dict[str, Any], kv_params: dict[str, Any] | None) -> dict[str, Any]:
    leg = dict(body)
    if kv_params is not None:
        leg["kv_transfer_params"] = kv_params
    return leg


async def prefill_leg(
    session: aiohttp.ClientSession,
    url: str,
    path: str,
    body: dict[str, Any],
    request_id: str,
    timeout_s: float,
) -> dict[str, Any]:
    """Run leg 1; return the kv_transfer_params for leg 2."""
    try:
        async with session.post(
            f"{url}{path}",
            data=json.dumps(prefill_body(body)).encode(),
            headers={"Content-Type": "application/json", "X-Request-Id": request_id},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise PrefillFailed(f"prefill worker answered {resp.status}: {text[:200]}")
    except TimeoutError:
        raise PrefillFailed(f"prefill leg timed out after {timeout_s:.0f}s") from None
    except aiohttp.ClientError as exc:
        raise PrefillFailed(f"prefill worker unreachable: {exc}") from None
    try:
        params = json.loads(text).get("kv_transfer_params")
    except (ValueError, AttributeError):
        raise PrefillFailed("prefill worker answered with invalid JSON") from None
    if not isinstance(params, dict) or not params.get("remote_block_ids"):
        raise PrefillFailed("prefill worker returned no kv_transfer_params")
    return params
