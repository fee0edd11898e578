"""Stage 4, choose: the workers and the path of one request.

The Filter → Score → Pick cycle of llm-d's endpoint picker, over pdbox's own
plugins:

- filter: workers that may serve the request whole (decode or aggregated;
  prefill too where soft roles let it, soft_roles.py), less those that
  already failed it;
- score and pick: `Picker` (policy.py: prefix, queue and KV scorers, the
  load guard, session affinity), then soft roles' tie rule (stay home);
- path: whole on a prefill worker (soft role), aggregated, or in P/D local
  or remote prefill (`PDDecider`, weighed by soft roles), with the prefill
  worker picked by the same scorers.

Pure of I/O: the answer is a `Route`, or a `Reply` (an HTTP answer to give
the client at once).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from pdbox.router import openai_errors as oe
from pdbox.router.backends import Backend, Registry
from pdbox.router.match import PrefixMatch
from pdbox.router.parse import Call
from pdbox.router.policy import NoWorker, PDDecider, Picker
from pdbox.router.prompt import Prompt, PromptStage
from pdbox.router.soft_roles import SoftRoles


class Reply(Exception):
    """An answer for the client now, instead of a route (503, 400)."""

    def __init__(self, response: web.Response, outcome: str | None = None) -> None:
        super().__init__(outcome or "reply")
        self.response = response
        self.outcome = outcome


@dataclass(slots=True)
class Route:
    decode: Backend  # the worker that serves the answer
    prefill: Backend | None  # the worker asked to prefill (remote), else None
    pd: str  # whole | aggregated | local | remote
    reason: str
    matched_tokens: int  # prompt tokens the decode worker already holds
    uncached: int
    last_try: bool  # no other worker to retry on
    kv_params: dict[str, Any] | None = None  # from the prefill leg
    headers: dict[str, str] = field(default_factory=dict)


class PathChooser:
    def __init__(self, registry: Registry, match: PrefixMatch, prompts: PromptStage,
                 picker: Picker, prefill_picker: Picker, decider: PDDecider, soft: SoftRoles,
                 is_pd: bool, serving_roles: Callable[[], tuple[str, ...]],
                 slice_key: Callable[[str], str], policy: str) -> None:
        self.registry = registry
        self.match = match
        self.prompts = prompts
        self.picker = picker
        self.prefill_picker = prefill_picker
        self.decider = decider
        self.soft = soft
        self.is_pd = is_pd
        self.serving_roles = serving_roles
        self.slice_key = slice_key
        self.policy = policy

    def choose(self, call: Call, prompt: Prompt, excluded: set[str], attempt: int) -> Route:
        decode, matched, cands, reason, soft_note = self._pick(call, prompt, excluded)
        route = Route(decode, None, "aggregated", reason, matched, prompt.tokens - matched,
                      last_try=attempt >= 2 or cands == 1)
        self._path(call, prompt, route, soft_note)
        return route

    # ---------------------------------------------------- filter, score, pick

    def _pick(self, call: Call, prompt: Prompt,
              excluded: set[str]) -> tuple[Backend, int, int, str, str]:
        """(decode worker, its matched tokens, candidates, the pick's reason, soft roles' note)."""
        cands = [b for b in self.registry.of_roles(self.serving_roles())
                 if b.id not in excluded]
        matches = self.match.match([b.id for b in cands], prompt.hashes)
        cands, soft_note = self._soft_candidates(cands, matches, prompt.units, call)
        if not cands:
            raise Reply(oe.error_response(503, "No worker is ready to serve this request.",
                                          "service_unavailable", headers={"Retry-After": "5"}),
                        "unavailable")
        try:
            pick = self.picker.pick([b.view() for b in cands], matches, len(prompt.hashes),
                                    self.policy, call.session_key)
        except NoWorker as exc:
            raise Reply(oe.error_response(503, str(exc), "service_unavailable")) from None
        if self.soft.enabled:
            pick = self.soft.prefer_home(pick, {b.id: b.role for b in cands})
        decode = self.registry.get(pick.worker_id)
        assert decode is not None
        matched = self.prompts.tokens_of(
            min(prompt.units, matches.get(decode.id, 0) * self.prompts.block_size))
        reason = pick.reason
        if decode.role == "prefill":
            reason = f"whole on {decode.id} (soft role): {soft_note}; {pick.reason}"
        return decode, matched, len(cands), reason, soft_note

    def _soft_candidates(self, cands: list[Backend], matches: dict[str, float], units: int,
                         call: Call) -> tuple[list[Backend], str]:
        """Prefill workers stay candidates only where soft roles let them serve whole
        (always while no decode worker is; never when the client forces a P/D path)."""
        pre = [b for b in cands if b.role == "prefill"]
        if not pre:
            return cands, ""
        n_dec = len(cands) - len(pre)
        if n_dec and call.forced:
            return [b for b in cands if b.role != "prefill"], ""
        tokens = self.prompts.tokens_of
        bs = self.prompts.block_size
        uncached = {b.id: tokens(units) - tokens(min(units, matches.get(b.id, 0) * bs))
                    for b in pre}
        ok, note = self.soft.eligible([b.view() for b in pre], uncached, n_dec,
                                      time.monotonic())
        return [b for b in cands if b.role != "prefill" or b.id in ok], note

    # ---------------------------------------------------------------- path

    def _path(self, call: Call, prompt: Prompt, route: Route, soft_note: str) -> None:
        """Whole, aggregated, local or remote; the prefill worker for remote."""
        decode = route.decode
        batch = _prompt_count(call.body)
        reverse = decode.role == "prefill"
        if reverse and not (self.soft.settings.hybrid and self.soft.enabled):
            route.pd = "whole"  # soft role: the prefill worker serves it end to end
            return
        if not (self.is_pd and decode.role in ("decode", "prefill")):
            return
        if reverse:
            route.pd = "whole"  # unless the decider sends its prefill to a decode worker
        if batch > 1:
            # kv_transfer_params name one request's blocks; a batch prefills where it decodes.
            route.pd, route.reason = "local", f"local: a batch of {batch} prompts"
            return
        force = call.force or None
        if force not in (None, "auto", "remote", "local"):
            raise Reply(oe.error_response(400, "x-pdbox-pd must be 'remote', 'local' or 'auto'.",
                                          "invalid_request_error"), "bad_request")
        prefill: Backend | None = None
        # Hybrid, the reverse direction: a request at home on a prefill worker may
        # have its prompt prefilled by a decode worker (both kv roles serve either
        # leg in vLLM 0.32, docs/PD.md).
        prefills = [b for b in self.registry.of_roles(("decode",) if reverse else ("prefill",))
                    if b.id != decode.id and b.routable]
        if prefills:
            pm = self.match.match([b.id for b in prefills], prompt.hashes)
            pp = self.prefill_picker.pick([b.view() for b in prefills], pm, len(prompt.hashes),
                                          "prefix" if self.policy == "prefix" else self.policy)
            prefill = self.registry.get(pp.worker_id)
        for b in (decode, prefill):
            if b is not None:
                self.decider.set_slice(b.id, self.slice_key(b.role))
        dec = self.decider.decide(route.uncached, prefill.view() if prefill else None,
                                  decode.view(), time.monotonic(),
                                  None if force == "auto" else force)
        if prefill is not None and force in (None, "auto"):
            dec = self.soft.weigh(dec, prefill.view(), decode.view(),
                                  route.uncached / self.decider.prefill_tps(prefill.id))
        route.reason = dec.reason + (f"; {soft_note}" if soft_note else "")
        if reverse:
            route.reason = f"whole on {decode.id} (hybrid): {route.reason}"
            route.pd = "remote" if dec.remote else "whole"
        else:
            route.pd = "remote" if dec.remote else "local"
        route.prefill = prefill if dec.remote else None


def _prompt_count(body: dict[str, Any]) -> int:
    """How many prompts a request carries (a completions prompt may be a list of them)."""
    p = body.get("prompt")
    if isinstance(p, list) and p and not isinstance(p[0], int):
        return len(p)
    return 1
