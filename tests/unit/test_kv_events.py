"""KV events: decoding vLLM's encodings and a live ZMQ PUB → SUB feed."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import zmq

from pdbox.router.kv_events import (
    EventDecodeError,
    KVEventSubscriber,
    decode_batch,
    decode_event,
    subscriber_address,
)
from pdbox.router.prefix_index import PreciseIndex, block_hashes

BS = 4
TOKENS = list(range(100, 116))  # 4 blocks


def stored_map(hashes, parent, tokens):
    # vLLM 0.32: events are tagged maps, omit_defaults drops trailing defaults.
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
            "token_ids": tokens, "block_size": BS, "lora_id": None, "medium": "GPU",
            "lora_name": None}


def batch(ts, events):
    return msgpack.packb([ts, events], use_bin_type=True)  # EventBatch is array_like


def frames(seq, payload, topic=b"kv@decode-0"):
    return [topic, seq.to_bytes(8, "big"), payload]


def test_decode_map_and_array_events() -> None:
    ev = decode_event(["BlockStored", [1, 2], None, TOKENS[:8], BS, None, "GPU"])
    assert ev["type"] == "BlockStored" and ev["block_hashes"] == [1, 2]
    assert ev["token_ids"] == TOKENS[:8] and ev["block_size"] == BS
    assert decode_event(["BlockRemoved", [1], "GPU"]) == {
        "type": "BlockRemoved", "block_hashes": [1], "medium": "GPU"}
    assert decode_event(["AllBlocksCleared"]) == {"type": "AllBlocksCleared"}
    assert decode_event({"type": "AllBlocksCleared"})["type"] == "AllBlocksCleared"
    with pytest.raises(EventDecodeError):
        decode_event(42)


def test_decode_batch_forms() -> None:
    ts, evs = decode_batch(batch(1.5, [stored_map([b"a"], None, TOKENS[:4])]))
    assert ts == 1.5 and evs[0]["block_hashes"] == [b"a"]
    ts, evs = decode_batch(msgpack.packb({"ts": 2.0, "events": []}))
    assert ts == 2.0 and evs == []
    with pytest.raises(EventDecodeError):
        decode_batch(b"\xc1")
    with pytest.raises(EventDecodeError):
        decode_batch(msgpack.packb(7))


def test_msgspec_encoding_matches_vllm_structs() -> None:
    """Encode with msgspec structs declared as vLLM declares them."""
    msgspec = pytest.importorskip("msgspec")

    class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
        ts: float
        events: list
        data_parallel_rank: int | None = None

    class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
        pass

    class BlockStored(KVCacheEvent):
        block_hashes: list
        parent_block_hash: int | bytes | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None
        extra_keys: list | None = None
        group_idx: int | None = None

    class BlockRemoved(KVCacheEvent):
        block_hashes: list
        medium: str | None
        group_idx: int | None = None

    payload = msgspec.msgpack.Encoder().encode(EventBatch(ts=3.0, events=[
        BlockStored([b"h1", b"h2"], None, TOKENS[:8], BS, None, "GPU", None),
        BlockRemoved([b"h2"], "GPU"),
    ], data_parallel_rank=0))
    idx = PreciseIndex(BS)
    ts, evs = decode_batch(payload)
    for ev in evs:
        idx.apply("w", ev)
    assert ts == 3.0 and idx.match("w", block_hashes(TOKENS, BS)) == 1


def test_handle_applies_events_and_clears_on_gap() -> None:
    idx = PreciseIndex(BS)
    sub = KVEventSubscriber("tcp://127.0.0.1:1", "decode-0", idx)
    sub.handle(frames(0, batch(1.0, [stored_map([1, 2], None, TOKENS[:8])])))
    sub.handle(frames(1, batch(1.1, [stored_map([3], 2, TOKENS[8:12])])))
    h = block_hashes(TOKENS, BS)
    assert idx.match("decode-0", h) == 3
    # seq 2 lost: the index cannot be trusted, so it is cleared, then refilled.
    sub.handle(frames(3, batch(1.3, [stored_map([9], None, [7, 7, 7, 7])])))
    assert sub.gaps == 1
    assert idx.match("decode-0", h) == 0
    assert idx.match("decode-0", block_hashes([7, 7, 7, 7], BS)) == 1
    sub.handle(frames(4, b"not msgpack"))
    sub.handle([b"short"])
    assert sub.errors == 2
    assert sub.snapshot()["last_seq"] == 4


def test_subscriber_address_mirrors_vllm_bind_rule() -> None:
    assert subscriber_address("tcp://*:5557") == ("tcp://127.0.0.1:5557", False)
    assert subscriber_address("tcp://127.0.0.1:5557") == ("tcp://127.0.0.1:5557", True)
    assert subscriber_address("ipc:///tmp/kv") == ("ipc:///tmp/kv", False)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("worker_binds", [True, False])
def test_live_zmq_feed(worker_binds: bool) -> None:
    """A real PUB socket, set up as vLLM sets it up for either kind of endpoint."""

    async def go() -> None:
        ctx = zmq.Context.instance()
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        idx = PreciseIndex(BS)
        if worker_binds:  # endpoint "tcp://*:P": vLLM binds, the router connects
            port = pub.bind_to_random_port("tcp://127.0.0.1")
            endpoint = f"tcp://*:{port}"
        else:  # endpoint "tcp://127.0.0.1:P": vLLM connects, the router binds
            endpoint = f"tcp://127.0.0.1:{_free_port()}"
        sub = KVEventSubscriber(endpoint, "decode-0", idx, topic="kv@decode-0")
        assert sub.bind is not worker_binds
        sub.start()
        await sub.wait_connected()
        if not worker_binds:
            pub.connect(endpoint)
        try:
            h = block_hashes(TOKENS, BS)
            seq = 0
            # PUB/SUB drops messages until the subscription has propagated: resend
            # a harmless batch until the subscriber sees one.
            for _ in range(200):
                pub.send_multipart(frames(seq, batch(0.0, [])))
                seq += 1
                await asyncio.sleep(0.01)
                if sub.batches:
                    break
            assert sub.batches, "subscriber never received a batch"
            pub.send_multipart([b"other-topic", b"\0" * 8, batch(0.0, [])])
            pub.send_multipart(frames(seq, batch(1.0, [
                stored_map([b"x1", b"x2"], None, TOKENS[:8]),
                stored_map([b"x3", b"x4"], b"x2", TOKENS[8:16]),
            ])))
            seq += 1
            pub.send_multipart(frames(seq, batch(1.1, [
                {"type": "BlockRemoved", "block_hashes": [b"x4"], "medium": "GPU"}])))
            for _ in range(200):
                await asyncio.sleep(0.01)
                if sub.last_seq == seq:
                    break
            assert idx.match("decode-0", h) == 3
            assert sub.gaps == 0 and sub.errors == 0
        finally:
            await sub.stop()
            pub.close(linger=0)

    asyncio.run(go())


def test_bind_failure_is_reported() -> None:
    async def go() -> None:
        ctx = zmq.Context.instance()
        taken = ctx.socket(zmq.SUB)
        taken.setsockopt(zmq.LINGER, 0)
        port = taken.bind_to_random_port("tcp://127.0.0.1")
        sub = KVEventSubscriber(f"tcp://127.0.0.1:{port}", "w", PreciseIndex(BS))
        sub.start()
        try:
            with pytest.raises(OSError, match="cannot bind"):
                await sub.wait_connected()
            assert sub.snapshot()["error"]
        finally:
            await sub.stop()
            taken.close(linger=0)

    asyncio.run(go())
