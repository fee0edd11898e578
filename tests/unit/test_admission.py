"""Admission: bound, priority classes, aging, short-before-long, 429."""

from __future__ import annotations

import asyncio

import pytest

from pdbox.router.admission import Admission, QueueFull


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


async def _order(adm: Admission, clock: Clock, arrivals: list[tuple[float, str, str, int]]):
    """Hold the only slot, queue `arrivals` (t, name, priority, tokens), then drain."""
    holder = await adm.acquire()
    served: list[str] = []

    async def one(name: str, prio: str, tokens: int) -> None:
        ticket = await adm.acquire(prio, tokens)
        served.append(name)
        await asyncio.sleep(0)
        adm.release(ticket)

    tasks = []
    for t, name, prio, tokens in arrivals:
        clock.t = t
        tasks.append(asyncio.create_task(one(name, prio, tokens)))
        await asyncio.sleep(0)
    adm.release(holder)
    await asyncio.gather(*tasks)
    return served


def run(coro):
    return asyncio.run(coro)


def test_immediate_when_free() -> None:
    async def go() -> None:
        adm = Admission(queue_bound=2, max_inflight=2)
        a = await adm.acquire()
        b = await adm.acquire()
        assert adm.inflight == 2 and a.waited_s == 0.0
        adm.release(a)
        adm.release(a)  # double release is harmless
        assert adm.inflight == 1
        adm.release(b)
        assert adm.inflight == 0

    run(go())


def test_interactive_before_batch() -> None:
    clock = Clock()
    adm = Admission(queue_bound=10, max_inflight=1, clock=clock, batch_delay_s=30)
    served = run(_order(adm, clock, [(0, "b1", "batch", 10), (1, "i1", "interactive", 10),
                                     (2, "i2", "interactive", 10)]))
    assert served == ["i1", "i2", "b1"]


def test_batch_ages_past_newer_interactive() -> None:
    clock = Clock()
    adm = Admission(queue_bound=10, max_inflight=1, clock=clock, batch_delay_s=30)
    served = run(_order(adm, clock, [(0, "b1", "batch", 10), (31, "i1", "interactive", 10)]))
    assert served == ["b1", "i1"]


def test_short_requests_pass_long_ones_that_arrived_just_before() -> None:
    clock = Clock()
    adm = Admission(queue_bound=10, max_inflight=1, clock=clock,
                    cost_s_per_token=1e-4, max_cost_s=2.0)
    served = run(_order(adm, clock, [(0.0, "long", "interactive", 30_000),
                                     (0.5, "short", "interactive", 100),
                                     (5.0, "late-short", "interactive", 100)]))
    # The cost bias is capped at 2 s: the long request still goes before late arrivals.
    assert served == ["short", "long", "late-short"]


def test_queue_full_raises_with_retry_after() -> None:
    async def go() -> None:
        adm = Admission(queue_bound=1, max_inflight=1, prior_hold_s=4.0)
        held = await adm.acquire()
        waiter = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        assert adm.queued == 1
        with pytest.raises(QueueFull) as info:
            await adm.acquire()
        assert info.value.retry_after_s >= 1
        assert "queue is full" in str(info.value)
        assert adm.rejected == 1
        adm.release(held)
        adm.release(await waiter)
        assert adm.snapshot()["admitted"] == 2

    run(go())


def test_cancelled_waiter_frees_its_place() -> None:
    async def go() -> None:
        adm = Admission(queue_bound=1, max_inflight=1)
        held = await adm.acquire()
        waiter = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert adm.queued == 0
        nxt = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        adm.release(held)
        t = await nxt
        assert adm.inflight == 1
        adm.release(t)
        assert adm.inflight == 0

    run(go())


def test_retry_after_grows_with_hold_time() -> None:
    clock = Clock()

    async def go() -> None:
        adm = Admission(queue_bound=4, max_inflight=1, clock=clock, prior_hold_s=1.0)
        before = adm.retry_after_s()
        for _ in range(10):
            t = await adm.acquire()
            clock.t += 20.0
            adm.release(t)
        assert adm.retry_after_s() > before

    run(go())


def test_bad_priority() -> None:
    with pytest.raises(ValueError):
        run(Admission(1, 1).acquire("urgent"))


def test_interactive_at_a_full_queue_turns_away_the_newest_batch_waiter() -> None:
    async def go() -> None:
        adm = Admission(queue_bound=2, max_inflight=1)
        held = await adm.acquire()
        old_batch = asyncio.create_task(adm.acquire("batch"))
        new_batch = asyncio.create_task(adm.acquire("batch"))
        await asyncio.sleep(0)
        assert adm.queued == 2
        first = asyncio.create_task(adm.acquire("interactive"))
        for _ in range(3):
            await asyncio.sleep(0)
        assert new_batch.done() and isinstance(new_batch.exception(), QueueFull)
        assert not old_batch.done() and adm.queued == 2
        second = asyncio.create_task(adm.acquire("interactive"))
        for _ in range(3):
            await asyncio.sleep(0)
        assert old_batch.done() and isinstance(old_batch.exception(), QueueFull)
        # With no batch waiter left, a full queue turns the next one away.
        with pytest.raises(QueueFull):
            await adm.acquire("interactive")
        assert adm.rejected == 3
        adm.release(held)
        adm.release(await first)
        adm.release(await second)

    run(go())


def test_batch_keeps_slots_free_for_interactive() -> None:
    async def go() -> None:
        adm = Admission(queue_bound=10, max_inflight=4, batch_share=0.75)  # not the default
        batch = [await adm.acquire("batch") for _ in range(3)]
        # The fourth batch request waits although a slot is free...
        fourth = asyncio.create_task(adm.acquire("batch"))
        await asyncio.sleep(0)
        assert not fourth.done() and adm.inflight == 3
        # ...which an interactive request takes at once.
        t = await asyncio.wait_for(adm.acquire("interactive"), 1)
        assert adm.inflight == 4
        adm.release(t)
        adm.release(batch[0])
        adm.release(await asyncio.wait_for(fourth, 1))
        for b in batch[1:]:
            adm.release(b)
        assert adm.inflight == 0

    run(go())


def test_interactive_that_would_miss_its_target_is_refused_at_once() -> None:
    async def go() -> None:
        adm = Admission(queue_bound=50, max_inflight=1, prior_hold_s=2.0,
                        interactive_wait_s=3.0)
        held = await adm.acquire("interactive")
        first = asyncio.create_task(adm.acquire("interactive"))  # expected wait 2 s
        await asyncio.sleep(0)
        assert not first.done()
        # The next one would wait about 4 s > 3 s: 429 now, not a late answer.
        with pytest.raises(QueueFull) as info:
            await adm.acquire("interactive")
        assert info.value.retry_after_s >= 1
        # Batch requests have no target: they queue.
        b = asyncio.create_task(adm.acquire("batch"))
        await asyncio.sleep(0)
        assert not b.done()
        adm.release(held)
        adm.release(await first)
        adm.release(await b)

    run(go())
