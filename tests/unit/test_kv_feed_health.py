"""KV-event feed faults: gaps filled by replay, clears, restarts, silence, bind errors.

The publisher here speaks vLLM 0.32's ZmqEventPublisher protocol (PUB for
batches, a ROUTER answering replay requests from its buffer, then an end
marker with seq -1); tests/faults/test_kv_events_real.py runs the same
paths against real workers.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections import deque
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from pdbox import config
from pdbox.router.app import Router
from pdbox.router.backends import Registry
from pdbox.router.kv_events import (
    FAULTS_ENV,
    KVEventSubscriber,
    render_prometheus,
    replay_endpoint_for,
)
from pdbox.router.prefix_index import PreciseIndex, block_hashes
from pdbox.router.tokenize import CharBlockTokenizer

BS = 4
END_SEQ = (-1).to_bytes(8, "big", signed=True)
_names = itertools.count()


def stored(hashes: list[Any], parent: Any, tokens: list[int]) -> dict[str, Any]:
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
            "token_ids": tokens, "block_size": BS}


def batch(*events: dict[str, Any]) -> bytes:
    return msgpack.packb([0.0, list(events)], use_bin_type=True)


def frames(seq: int, payload: bytes) -> list[bytes]:
    return [b"kv@decode-0", seq.to_bytes(8, "big"), payload]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Publisher:
    """vLLM's publisher, wire for wire: PUB connects to the router, ROUTER replays."""

    def __init__(self, endpoint: str, replay: str, buffer_steps: int = 100):
        ctx = zmq.asyncio.Context.instance()
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.connect(endpoint)
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(replay)
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self.seq = 0
        self.replay_requests: list[int] = []
        self._task = asyncio.get_running_loop().create_task(self._serve_replay())

    async def publish(self, payload: bytes) -> None:
        await self.pub.send_multipart(frames(self.seq, payload))
        self.buffer.append((self.seq, payload))
        self.seq += 1

    async def _serve_replay(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            start_seq = int.from_bytes(start, "big")
            self.replay_requests.append(start_seq)
            for seq, buf in self.buffer:
                if seq >= start_seq:
                    await self.router.send_multipart(
                        (client, b"", b"kv@decode-0", seq.to_bytes(8, "big"), buf))
            await self.router.send_multipart((client, b"", b"", END_SEQ, b""))

    async def close(self) -> None:
        self._task.cancel()
        self.pub.close(linger=0)
        self.router.close(linger=0)


async def connected_pair(buffer_steps: int = 100, **sub_kw: Any
                         ) -> tuple[Publisher, KVEventSubscriber, PreciseIndex, list[str]]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    replay = f"ipc://@pdbox-test-replay-{next(_names)}-{free_port()}"
    idx = PreciseIndex(BS)
    said: list[str] = []
    idx.on_event = said.append
    sub = KVEventSubscriber(endpoint, "decode-0", idx, topic="kv@decode-0", replay=replay,
                            **sub_kw)
    sub.start()
    await sub.wait_connected()
    pub = Publisher(endpoint, replay, buffer_steps)
    # PUB drops batches until the subscription has propagated: the first
    # batches the subscriber sees may not be seq 0, which it catches up by replay.
    for _ in range(200):
        await pub.publish(batch())
        await asyncio.sleep(0.01)
        if sub.batches:
            break
    assert sub.batches, "subscriber never received a batch"
    return pub, sub, idx, said


async def until(pred: Any, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")


TOK = list(range(100, 116))  # 4 blocks


def test_replay_endpoint_is_an_abstract_socket_named_by_port() -> None:
    assert replay_endpoint_for("tcp://127.0.0.1:5557") == "ipc://@pdbox-kv-replay-5557"
    assert replay_endpoint_for("inproc://x") is None


def test_gap_recovered_by_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        pub, sub, idx, said = await connected_pair()
        try:
            sub._drop = {pub.seq, pub.seq + 1}  # the next two batches are lost on the way
            await pub.publish(batch(stored([b"a"], None, TOK[:4])))
            await pub.publish(batch(stored([b"b"], b"a", TOK[4:8])))
            await pub.publish(batch(stored([b"c"], b"b", TOK[8:12])))
            await until(lambda: sub.last_seq == pub.seq - 1)
            assert (sub.gaps, sub.replays, sub.clears) == (1, 1, 0)
            assert idx.match("decode-0", block_hashes(TOK, BS)) == 3  # nothing lost
            assert any("recovered by replay" in m for m in said)
        finally:
            await sub.stop()
            await pub.close()

    asyncio.run(go())


def test_gap_replay_cannot_cover_clears_and_says_so() -> None:
    async def go() -> None:
        pub, sub, idx, said = await connected_pair(buffer_steps=1)
        try:
            await pub.publish(batch(stored([b"a"], None, TOK[:4])))
            await until(lambda: sub.last_seq == pub.seq - 1)
            assert idx.match("decode-0", block_hashes(TOK, BS)) == 1
            sub._drop = {pub.seq, pub.seq + 1}
            await pub.publish(batch({"type": "BlockRemoved", "block_hashes": [b"a"]}))
            await pub.publish(batch())
            await pub.publish(batch(stored([b"z"], None, [7, 7, 7, 7])))  # buffer holds only this
            await until(lambda: sub.last_seq == pub.seq - 1)
            assert (sub.gaps, sub.replays, sub.clears) == (1, 0, 1)
            # The removal was lost, but the clear keeps the index from claiming "a".
            assert idx.match("decode-0", block_hashes(TOK, BS)) == 0
            assert idx.match("decode-0", block_hashes([7, 7, 7, 7], BS)) == 1
            assert any("replay could not cover" in m and "cleared" in m for m in said)
        finally:
            await sub.stop()
            await pub.close()

    asyncio.run(go())


def test_blocks_chained_on_prefixes_announced_before_a_gap_are_placed() -> None:
    """Before: after a clear, every block whose parent was announced earlier was skipped."""
    idx = PreciseIndex(BS)
    sub = KVEventSubscriber("tcp://127.0.0.1:1", "decode-0", idx, replay=None)
    sub.handle(frames(0, batch(stored([1, 2], None, TOK[:8]))))
    sub.handle(frames(5, batch()))  # a gap, no replay: cleared
    assert sub.clears == 1 and idx.match("decode-0", block_hashes(TOK, BS)) == 0
    # vLLM caches block 3 for a request that holds blocks 1 and 2: all three are there.
    sub.handle(frames(6, batch(stored([3], 2, TOK[8:12]))))
    assert idx.match("decode-0", block_hashes(TOK, BS)) == 3
    assert sub.unapplied == {}


def test_restarted_publisher_drops_the_index() -> None:
    idx = PreciseIndex(BS)
    said: list[str] = []
    idx.on_event = said.append
    sub = KVEventSubscriber("tcp://127.0.0.1:1", "decode-0", idx, replay=None)
    sub.handle(frames(7, batch(stored([1, 2], None, TOK[:8]))))
    sub.handle(frames(0, batch()))  # a new engine begins at seq 0
    assert sub.restarts == 1 and idx.size("decode-0") == 0
    # Its old lineage is gone too: the new engine's blocks need their own parents.
    sub.handle(frames(1, batch(stored([3], 2, TOK[8:12]))))
    assert idx.size("decode-0") == 0
    assert sub.unapplied == {"parent block never announced": 1}
    assert len(said) == 1 and "restarted" in said[0]


def test_events_that_cannot_be_applied_are_counted() -> None:
    idx = PreciseIndex(BS)
    sub = KVEventSubscriber("tcp://127.0.0.1:1", "decode-0", idx, replay=None)
    sub.handle(frames(0, batch(
        stored([9], 8, TOK[:4]),  # parent never seen
        {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None,
         "token_ids": TOK[:16], "block_size": 16},
        {"type": "SomethingNew"},
    )))
    snap = sub.snapshot()
    assert snap["unapplied"] == 3
    assert set(snap["unapplied_by_reason"]) == {
        "parent block never announced", "block size 16, router uses 4",
        "unknown event type 'SomethingNew'"}
    assert snap["events"] == 3


def test_a_silent_feed_is_not_trusted_and_says_so_once() -> None:
    now = [0.0]
    idx = PreciseIndex(BS)
    said: list[str] = []
    idx.on_event = said.append
    sub = KVEventSubscriber("tcp://127.0.0.1:1", "decode-0", idx, replay=None,
                            silence_s=10.0, clock=lambda: now[0])
    sub.connected = True
    sub.handle(frames(0, batch()))
    assert sub.trusted(0.0)
    now[0] = 5.0
    sub.expect(since=1.0, now=5.0)  # a prefill sent at 1 s, done at 5 s, no batch since
    assert sub.trusted(14.0)
    assert not sub.trusted(15.5) and not sub.trusted(20.0)
    assert len(said) == 1 and "silent" in said[0]
    now[0] = 20.0
    assert sub.snapshot()["state"] == "silent"
    now[0] = 21.0
    sub.handle(frames(1, batch()))
    assert sub.trusted(21.0) and "flowing again" in said[-1]
    # A batch already after the request was sent satisfies the expectation.
    sub.expect(since=20.0, now=22.0)
    assert sub.trusted(100.0)


def test_bind_error_is_one_event_and_routing_goes_on_approximately(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULTS_ENV, "nobind:decode-0")

    async def go() -> None:
        reg = Registry()
        reg.upsert("decode-0", "decode", "http://127.0.0.1:1", "ready")
        said: list[tuple[str, str]] = []
        r = Router(config.load("cpu-tiny"), reg, CharBlockTokenizer(), ["smollm2"],
                   events=lambda kind, msg: said.append((kind, msg)))
        assert r.precise is not None
        sub = KVEventSubscriber(f"tcp://127.0.0.1:{free_port()}", "decode-0", r.precise)
        sub.start()
        try:
            with pytest.raises(OSError, match="cannot bind"):
                await sub.wait_connected()
            hashes = [11, 12, 13]
            r.approx.record("decode-0", hashes)
            assert r._match(["decode-0"], hashes) == {"decode-0": 3}
            snap = r.snapshot()["kv_events"]["decode-0"]
            assert snap["state"] == "bind error" and not snap["trusted"]
            assert len(said) == 1 and said[0][0] == "kv" and "cannot bind" in said[0][1]
            assert 'pdbox_kv_events_bind_error{worker="decode-0"} 1' in render_prometheus(
                r.precise.feeds)
        finally:
            await sub.stop()

    asyncio.run(go())


def test_a_healthy_feed_is_the_truth_over_the_approximate_index() -> None:
    """Before: max(approx, precise) let stale approximate entries outvote evictions."""
    reg = Registry()
    for wid in ("decode-0", "decode-1"):
        reg.upsert(wid, "decode", f"http://{wid}", "ready")
    r = Router(config.load("cpu-tiny"), reg, CharBlockTokenizer(), ["smollm2"])
    assert r.precise is not None
    hashes = block_hashes(list(range(8 * r.block_size)), r.block_size)[:3]
    for wid in ("decode-0", "decode-1"):
        r.approx.record(wid, hashes)  # the router sent the prompt to both
    sub = KVEventSubscriber("tcp://127.0.0.1:1", "decode-0", r.precise, replay=None)
    r.precise.feeds["decode-0"] = sub
    sub.connected = True
    # decode-0's events say it evicted everything; decode-1 has no feed.
    assert r._match(["decode-0", "decode-1"], hashes) == {"decode-0": 0, "decode-1": 3}
    sub.error = "cannot bind"
    assert r._match(["decode-0"], hashes) == {"decode-0": 3}


def test_metrics_lines_per_worker() -> None:
    idx = PreciseIndex(BS)
    sub = KVEventSubscriber("tcp://127.0.0.1:1", "decode-0", idx, replay=None)
    sub.connected = True
    sub.handle(frames(3, batch()))
    text = "\n".join(render_prometheus({"decode-0": sub}))
    assert 'pdbox_kv_events_last_seq{worker="decode-0"} 3' in text
    assert 'pdbox_kv_events_trusted{worker="decode-0"} 1' in text
    assert "# TYPE pdbox_kv_events_gaps_total counter" in text
