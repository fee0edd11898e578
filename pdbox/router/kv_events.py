"""vLLM's KV-cache events, read from its ZMQ publisher into a PreciseIndex.

A vLLM worker started with `--kv-events-config '{"enable_kv_cache_events":
true,"publisher":"zmq","endpoint":"tcp://*:PORT","topic":"kv@NAME"}'`
publishes multipart messages `(topic, seq, payload)`:

- `seq` is an 8-byte big-endian counter, one per batch;
- `payload` is msgpack of an `EventBatch` msgspec struct. vLLM 0.32 encodes
  the batch `array_like` (`[ts, [events...], dp_rank?]`) and each event as a
  map tagged `{"type": "BlockStored", ...}`. Other vLLM releases encode the
  events `array_like` too: `["BlockStored", block_hashes, parent_block_hash,
  token_ids, block_size, ...]`. Both are decoded here.

A gap in `seq` means lost batches, so lost `BlockRemoved` events: the index
would claim blocks the worker no longer has. The subscriber then clears that
worker's index and lets it refill, which only costs hit rate for a while.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgpack

from pdbox.router.prefix_index import PreciseIndex

log = logging.getLogger(__name__)

# Field order of the array_like encoding (vllm/distributed/kv_events.py).
_FIELDS: dict[str, tuple[str, ...]] = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size"),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}


class EventDecodeError(ValueError):
    """A payload that is not a vLLM KV event batch."""


def decode_event(raw: Any) -> dict[str, Any]:
    """One event, map- or array-encoded, as a dict with "type" and vLLM's field names."""
    if isinstance(raw, dict):
        if "type" not in raw:
            raise EventDecodeError("event map has no 'type' tag")
        return raw
    if isinstance(raw, (list, tuple)) and raw and isinstance(raw[0], str):
        kind = raw[0]
        names = _FIELDS.get(kind, ())
        event: dict[str, Any] = {"type": kind}
        event.update(zip(names, raw[1:], strict=False))
        return event
    raise EventDecodeError(f"cannot decode event of type {type(raw).__name__}")


def decode_batch(payload: bytes) -> tuple[float, list[dict[str, Any]]]:
    """(timestamp, events) from one msgpack payload."""
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise EventDecodeError(f"not msgpack: {exc}") from None
    if isinstance(batch, dict):
        ts, events = batch.get("ts", 0.0), batch.get("events", [])
    elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
        ts, events = batch[0], batch[1]
    else:
        raise EventDecodeError("batch is neither [ts, events] nor a map")
    if not isinstance(events, (list, tuple)):
        raise EventDecodeError("batch events are not a list")
    return float(ts or 0.0), [decode_event(e) for e in events]


def subscriber_address(worker_endpoint: str) -> tuple[str, bool]:
    """Where the router's SUB socket goes for a worker's `endpoint`, and whether it binds.

    vLLM binds its PUB socket only for wildcard (`tcp://*:P`), ipc and inproc
    endpoints and *connects* for any other, e.g. `tcp://127.0.0.1:P`. Then the
    subscriber must bind that address itself. Loopback-only binding is the
    safer choice on a shared machine, so that is what pdbox uses.
    """
    if "*" in worker_endpoint:
        return worker_endpoint.replace("*", "127.0.0.1"), False
    if "::" in worker_endpoint or worker_endpoint.startswith(("ipc://", "inproc://")):
        return worker_endpoint, False
    return worker_endpoint, True


class KVEventSubscriber:
    """Feeds one worker's KV events into the shared PreciseIndex.

    `endpoint` is the one given to the worker in `--kv-events-config`; the
    subscriber connects or binds as `subscriber_address` says (override with
    `bind`). `start()` creates the asyncio task; `stop()` cancels it and
    closes the socket. `handle(frames)` is the whole per-message logic,
    callable on its own in tests.
    """

    def __init__(
        self,
        endpoint: str,
        worker_id: str,
        index: PreciseIndex,
        topic: str = "",
        bind: bool | None = None,
    ):
        address, auto_bind = subscriber_address(endpoint)
        self.endpoint = endpoint
        self.address = address
        self.bind = auto_bind if bind is None else bind
        self.worker_id = worker_id
        self.index = index
        self.topic = topic
        self.last_seq: int | None = None
        self.batches = 0
        self.events = 0
        self.gaps = 0
        self.errors = 0
        self.last_ts: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.error: str | None = None

    def handle(self, frames: list[bytes]) -> None:
        if len(frames) < 3:
            self.errors += 1
            return
        seq = int.from_bytes(frames[1], "big", signed=True)
        if seq < 0:  # vLLM's end-of-replay marker
            return
        if self.last_seq is not None and seq != self.last_seq + 1:
            # Lost (or restarted-from-zero) batches: what we hold may be stale.
            self.gaps += 1
            self.index.clear(self.worker_id)
            log.info("%s: KV event gap (%s after %s); index cleared",
                     self.worker_id, seq, self.last_seq)
        self.last_seq = seq
        try:
            ts, events = decode_batch(frames[2])
        except EventDecodeError as exc:
            self.errors += 1
            log.warning("%s: bad KV event batch: %s", self.worker_id, exc)
            return
        self.batches += 1
        self.last_ts = ts
        for ev in events:
            self.index.apply(self.worker_id, ev)
            self.events += 1

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"kv-events-{self.worker_id}"
            )
        return self._task

    async def wait_connected(self, timeout: float = 5.0) -> None:
        """Wait until the socket is set up; raise OSError if that failed."""
        await asyncio.wait_for(self._ready.wait(), timeout)
        if self.error:
            raise OSError(self.error)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    async def _run(self) -> None:
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
            try:
                if self.bind:
                    sock.bind(self.address)
                else:
                    sock.connect(self.address)
            except zmq.ZMQError as exc:
                self.error = f"cannot {'bind' if self.bind else 'connect'} {self.address}: {exc}"
                log.error("%s: KV events off: %s", self.worker_id, self.error)
                return
            finally:
                self._ready.set()
            while True:
                frames = await sock.recv_multipart()
                try:
                    self.handle(frames)
                except Exception:  # a bad event must not kill the feed
                    self.errors += 1
                    log.exception("%s: KV event not applied", self.worker_id)
        finally:
            sock.close(linger=0)

    def snapshot(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "bind": self.bind,
            "batches": self.batches,
            "events": self.events,
            "gaps": self.gaps,
            "errors": self.errors,
            "error": self.error,
            "last_seq": self.last_seq,
            "blocks": self.index.size(self.worker_id),
        }
