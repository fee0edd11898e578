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
would claim blocks the worker no longer has. vLLM's publisher keeps its last
`buffer_steps` batches and answers a replay request on its ROUTER socket
(`replay_endpoint`): the subscriber sends the first missing seq (8 bytes,
big-endian) from a DEALER and gets `(topic, seq, payload)` for each kept
batch from there on, then an end marker with seq -1. When the replay covers
the gap nothing is lost. When it cannot (the buffer moved on, no answer in
time), the worker's index is cleared and refills; the event says so. A seq
that goes backwards means the publisher restarted (a new engine): the
worker's index is dropped outright.

The subscriber also keeps its feed's health (connected, last seq, gaps,
replays, clears, events that could not be applied) and tells the index
whether its view of the worker may be trusted: not after a bind error, nor
while the stream is silent although the router sent the worker new blocks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import msgpack

from pdbox.router.prefix_index import PreciseIndex

log = logging.getLogger(__name__)

# Batches vLLM keeps for replay (its default; about a minute of a busy worker).
REPLAY_BUFFER_STEPS = 10_000
# A stream that stays silent this long after the router sent its worker new
# blocks is taken for dead; the worker's routing falls back to the approximate index.
SILENCE_S = 10.0
# Test hook for the fault tests: "drop:WORKER:A-B" loses batches A..B once at
# the receiver (a real gap, recovered through the worker's real replay
# socket); "nobind:WORKER" holds the subscriber's address so its bind fails.
FAULTS_ENV = "PDBOX_TEST_KV_FAULTS"

# Field order of the array_like encoding (vllm/distributed/kv_events.py).
_FIELDS: dict[str, tuple[str, ...]] = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size",
                    "lora_id", "medium"),
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


def replay_endpoint_for(worker_endpoint: str) -> str | None:
    """The replay socket pdbox gives a worker whose events go to `worker_endpoint`.

    An abstract Unix socket named after the events port: it needs no port of
    its own, leaves no file behind, and is unique while the events port is.
    """
    port = worker_endpoint.rsplit(":", 1)[-1]
    return f"ipc://@pdbox-kv-replay-{port}" if port.isdigit() else None


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
    """Feeds one worker's KV events into the shared PreciseIndex, and says how healthy.

    `endpoint` is the one given to the worker in `--kv-events-config`; the
    subscriber connects or binds as `subscriber_address` says (override with
    `bind`). `replay` is the worker's replay endpoint (derived as pdbox sets
    it; None: no replay). `start()` creates the asyncio task and registers
    the feed with the index; `stop()` cancels it, closes the sockets and
    unregisters. `handle(frames)` is the per-message logic without replay,
    callable on its own in tests; `replay_from` / `apply_replay` add replay.
    """

    def __init__(
        self,
        endpoint: str,
        worker_id: str,
        index: PreciseIndex,
        topic: str = "",
        bind: bool | None = None,
        replay: str | None | bool = True,
        replay_timeout_s: float = 2.0,
        silence_s: float = SILENCE_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        address, auto_bind = subscriber_address(endpoint)
        self.endpoint = endpoint
        self.address = address
        self.bind = auto_bind if bind is None else bind
        self.worker_id = worker_id
        self.index = index
        self.topic = topic
        self.replay = replay_endpoint_for(endpoint) if replay is True else (replay or None)
        self.replay_timeout_s = replay_timeout_s
        self.silence_s = silence_s
        self.clock = clock
        self.last_seq: int | None = None
        self.batches = 0
        self.events = 0
        self.gaps = 0
        self.replays = 0  # gaps filled by replay
        self.clears = 0  # gaps replay could not fill: index cleared
        self.restarts = 0  # the publisher began again from seq 0
        self.errors = 0  # frames or batches that could not be decoded
        self.unapplied: dict[str, int] = {}  # why -> events the index could not apply
        self.last_ts: float | None = None
        self.last_batch_at: float | None = None
        self.connected = False
        self.error: str | None = None
        self._due_by: float | None = None  # a batch is due by then (see `expect`)
        self._silent = False
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._drop, self._nobind = _faults_for(worker_id)

    # ------------------------------------------------------------ health

    def expect(self, since: float, now: float) -> None:
        """A request sent at `since` had the worker cache blocks its index lacks.

        Its prefill is done by `now`, so vLLM has published them: unless a
        batch came after `since`, one is due within `silence_s`.
        """
        if self.last_batch_at is not None and self.last_batch_at >= since:
            return
        if self._due_by is None:
            self._due_by = now + self.silence_s

    def trusted(self, now: float) -> bool:
        """Whether the index's view of this worker may be believed now."""
        if self.error or not self.connected:
            return False
        silent = self._due_by is not None and now > self._due_by
        if silent and not self._silent:
            self._silent = True
            self._say(f"KV events of {self.worker_id} silent: none came within "
                      f"{self.silence_s:.0f}s of a prefill that cached new blocks; routing to "
                      "it uses the approximate index")
        return not silent

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        trusted = self.trusted(now)
        state = ("bind error" if self.error else "connecting" if not self.connected
                 else "silent" if not trusted else "ok")
        return {
            "state": state,
            "trusted": trusted,
            "endpoint": self.endpoint,
            "replay_endpoint": self.replay,
            "bind": self.bind,
            "batches": self.batches,
            "events": self.events,
            "gaps": self.gaps,
            "replays": self.replays,
            "clears": self.clears,
            "restarts": self.restarts,
            "errors": self.errors,
            "unapplied": sum(self.unapplied.values()),
            "unapplied_by_reason": dict(self.unapplied),
            "error": self.error,
            "last_seq": self.last_seq,
            "last_batch_age_s": None if self.last_batch_at is None else now - self.last_batch_at,
            "blocks": self.index.size(self.worker_id),
        }

    def _say(self, message: str) -> None:
        log.warning("%s", message)
        self.index.notify(message)

    # ------------------------------------------------------- per message

    def replay_from(self, frames: list[bytes]) -> int | None:
        """The first missing seq when `frames` follow a gap a replay may fill, else None."""
        if self.replay is None or len(frames) < 3:
            return None
        seq = int.from_bytes(frames[1], "big", signed=True)
        if seq < 0:
            return None
        if self.last_seq is None:
            # Batches published before we subscribed (warm-up): catch up quietly.
            return 0 if seq > 0 else None
        if seq > self.last_seq + 1:
            self.gaps += 1
            self._say(f"KV events of {self.worker_id}: gap, seq {seq} after {self.last_seq}; "
                      "asking the worker to replay")
            return self.last_seq + 1
        return None

    def apply_replay(self, start: int, upto: int, replies: list[list[bytes]]) -> bool:
        """Apply replayed batches start..upto-1; True when they covered the gap.

        Whatever part of the gap they miss is lost: the worker's index is
        cleared first (and the event says so), then the later batches apply.
        """
        got: dict[int, bytes] = {}
        for f in replies:
            if len(f) >= 3:
                seq = int.from_bytes(f[1], "big", signed=True)
                if start <= seq < upto:
                    got[seq] = f[2]
        covered = all(s in got for s in range(start, upto))
        catch_up = self.last_seq is None
        if covered:
            if not catch_up:
                self.replays += 1
                self._say(f"KV events of {self.worker_id}: gap of {upto - start} batch(es) "
                          "recovered by replay")
        elif not catch_up:
            self.clears += 1
            kept = f"it kept from seq {min(got)}" if got else "no answer in time"
            self.index.clear(self.worker_id)
            self._say(f"KV events of {self.worker_id}: replay could not cover seq {start}-"
                      f"{upto - 1} ({kept}); its prefix index was cleared and refills")
        for seq in sorted(got):
            self._apply_payload(got[seq])
        self.last_seq = upto - 1
        return covered

    def handle(self, frames: list[bytes]) -> None:
        if len(frames) < 3:
            self.errors += 1
            return
        seq = int.from_bytes(frames[1], "big", signed=True)
        if seq < 0:  # vLLM's end-of-replay marker
            return
        if self.last_seq is not None and seq <= self.last_seq:
            # A new engine behind the same endpoint: what we held is gone.
            self.restarts += 1
            self.index.remove_worker(self.worker_id)
            self._say(f"KV events of {self.worker_id} began again (seq {seq} after "
                      f"{self.last_seq}): the worker restarted; its prefix index was cleared")
        elif self.last_seq is not None and seq != self.last_seq + 1:
            self.gaps += 1
            self.clears += 1
            self.index.clear(self.worker_id)
            self._say(f"KV events of {self.worker_id}: gap, seq {seq} after {self.last_seq}, "
                      "no replay; its prefix index was cleared and refills")
        self.last_seq = seq
        self._apply_payload(frames[2])

    def _apply_payload(self, payload: bytes) -> None:
        try:
            ts, events = decode_batch(payload)
        except EventDecodeError as exc:
            self.errors += 1
            log.warning("%s: bad KV event batch: %s", self.worker_id, exc)
            return
        self.batches += 1
        self.last_ts = ts
        self.last_batch_at = self.clock()
        self._due_by = None
        if self._silent:
            self._silent = False
            self._say(f"KV events of {self.worker_id} flowing again")
        for ev in events:
            why = self.index.apply(self.worker_id, ev)
            self.events += 1
            if why is not None:
                if why not in self.unapplied:
                    log.warning("%s: KV event not applied: %s", self.worker_id, why)
                self.unapplied[why] = self.unapplied.get(why, 0) + 1

    # ------------------------------------------------------------ sockets

    def start(self) -> asyncio.Task[None]:
        self.index.feeds[self.worker_id] = self
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
        if self.index.feeds.get(self.worker_id) is self:
            del self.index.feeds[self.worker_id]
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
        held = _hold(self.address) if self._nobind and self.bind else None
        try:
            sock.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
            try:
                if self.bind:
                    sock.bind(self.address)
                else:
                    sock.connect(self.address)
                self.connected = True
            except zmq.ZMQError as exc:
                self.error = f"cannot {'bind' if self.bind else 'connect'} {self.address}: {exc}"
                self._say(f"KV events of {self.worker_id} off: {self.error}; routing to it "
                          "uses the approximate index")
                return
            finally:
                self._ready.set()
            while True:
                frames = await sock.recv_multipart()
                if self._dropped(frames):
                    continue
                try:
                    start = self.replay_from(frames)
                    if start is not None:
                        upto = int.from_bytes(frames[1], "big", signed=True)
                        self.apply_replay(start, upto, await self._ask_replay(ctx, start))
                    self.handle(frames)
                except Exception:  # a bad event must not kill the feed
                    self.errors += 1
                    log.exception("%s: KV event not applied", self.worker_id)
        finally:
            self.connected = False
            sock.close(linger=0)
            if held is not None:
                held.close()

    async def _ask_replay(self, ctx: Any, start: int) -> list[list[bytes]]:
        """Ask the worker's replay socket for batches from `start`; [] if it does not answer."""
        import zmq

        assert self.replay is not None
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        replies: list[list[bytes]] = []
        try:
            dealer.connect(self.replay)
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            deadline = time.monotonic() + self.replay_timeout_s
            while (left := deadline - time.monotonic()) > 0:
                if not await dealer.poll(timeout=int(left * 1000) + 1):
                    break
                frames = (await dealer.recv_multipart())[1:]  # drop the empty delimiter
                if len(frames) >= 2 and int.from_bytes(frames[1], "big", signed=True) < 0:
                    return replies
                replies.append(frames)
            log.warning("%s: replay from seq %d got no end marker in %.1fs",
                        self.worker_id, start, self.replay_timeout_s)
            return replies
        finally:
            dealer.close(linger=0)

    def _dropped(self, frames: list[bytes]) -> bool:
        if not self._drop or len(frames) < 3:
            return False
        seq = int.from_bytes(frames[1], "big", signed=True)
        if seq in self._drop:
            self._drop.discard(seq)
            return True
        return False


def _faults_for(worker_id: str) -> tuple[set[int], bool]:
    drop: set[int] = set()
    nobind = False
    for part in os.environ.get(FAULTS_ENV, "").split(";"):
        bits = part.strip().split(":")
        if len(bits) == 3 and bits[0] == "drop" and bits[1] == worker_id:
            a, _, b = bits[2].partition("-")
            drop.update(range(int(a), int(b or a) + 1))
        elif len(bits) == 2 and bits == ["nobind", worker_id]:
            nobind = True
    return drop, nobind


def _hold(address: str) -> socket.socket | None:
    """Bind a plain TCP socket on a tcp:// address so that a later bind there fails."""
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    s = socket.socket()
    try:
        s.bind((host, int(port)))
        s.listen(1)
    except (OSError, ValueError):
        s.close()
        return None
    return s


def render_prometheus(feeds: dict[str, Any]) -> list[str]:
    """/metrics lines for each worker's KV-event feed health."""
    rows = {wid: f.snapshot() for wid, f in sorted(feeds.items())}
    out: list[str] = []
    for name, kind, key, help_ in (
        ("pdbox_kv_events_trusted", "gauge", "trusted",
         "1 when the worker's KV-event feed is healthy and its precise index is used."),
        ("pdbox_kv_events_last_seq", "gauge", "last_seq", "Last KV-event batch seq applied."),
        ("pdbox_kv_events_batches_total", "counter", "batches", "KV-event batches applied."),
        ("pdbox_kv_events_gaps_total", "counter", "gaps", "Sequence gaps seen."),
        ("pdbox_kv_events_replays_total", "counter", "replays", "Gaps recovered by replay."),
        ("pdbox_kv_events_clears_total", "counter", "clears",
         "Gaps replay could not cover: the worker's index was cleared."),
        ("pdbox_kv_events_restarts_total", "counter", "restarts",
         "Times the worker's event stream began again (worker restarted)."),
        ("pdbox_kv_events_unapplied_total", "counter", "unapplied",
         "KV events the index could not apply."),
        ("pdbox_kv_events_errors_total", "counter", "errors", "Undecodable KV-event messages."),
        ("pdbox_kv_events_bind_error", "gauge", "error",
         "1 when the subscriber could not set up its socket."),
    ):
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        for wid, snap in rows.items():
            v = snap.get(key)
            if key == "error":
                v = 1 if v else 0
            if v is None:
                continue
            out.append(f'{name}{{worker="{wid}"}} {float(v):g}')
    return out
