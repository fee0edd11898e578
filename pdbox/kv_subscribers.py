"""One KV-event subscriber per managed worker, feeding the router's precise index.

A worker that stops or restarts takes its cache with it; the subscriber is
started with the worker and stopped with it, and what it reports (gaps,
replays, a stream that will not bind) reaches the Events pane through the
index's notifications.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pdbox.router.app import Router


class KvSubscribers:
    def __init__(self, router: Router, event: Callable[[str, str], None]) -> None:
        self.router = router
        self.event = event
        self.subs: dict[str, Any] = {}

    def start(self, w: Any) -> None:
        """Subscribe to worker `w`'s KV events, when the profile turns them on."""
        if self.router.precise is None or not w.spec.ports.kv_events:
            return
        from pdbox.router.kv_events import KVEventSubscriber

        sub = KVEventSubscriber(f"tcp://127.0.0.1:{w.spec.ports.kv_events}", w.id,
                                self.router.precise, topic=f"kv@{w.id}")
        sub.start()
        self.subs[w.id] = sub

    async def stop(self, worker_id: str) -> None:
        sub = self.subs.pop(worker_id, None)
        if sub is not None:
            await sub.stop()

    async def stop_all(self) -> None:
        for wid in list(self.subs):
            try:
                await self.stop(wid)
            except Exception:  # noqa: BLE001 - stopping must go on for the others
                pass
