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


# ------------------------------------------------------- Retry-After that is true


def _interactive_burst(adm: Admission, n: int) -> list[float]:
    """n interactive requests at one instant against a full box: their Retry-After."""
    out = []

    async def go() -> None:
        for _ in range(n):
            try:
                t = await asyncio.wait_for(adm.acquire(), 0.01)
                out.append(0.0)
                del t
            except QueueFull as exc:
                out.append(exc.retry_after_s)
            except TimeoutError:
                out.append(-1.0)  # queued

    run(go())
    return out


def test_a_refused_burst_is_told_to_come_back_spread_out() -> None:
    clock = Clock()
    adm = Admission(queue_bound=64, max_inflight=4, clock=clock, prior_hold_s=8.0,
                    interactive_wait_s=1.5)
    got = _interactive_burst(adm, 24)
    refused = [r for r in got if r > 0]
    assert len(refused) >= 15
    # One slot frees every hold/slots = 2 s: each refused client gets its own return time.
    gaps = [b - a for a, b in zip(refused, refused[1:], strict=False)]
    assert all(g == pytest.approx(2.0) for g in gaps), gaps
    assert adm.snapshot()["retries_promised"] == len(refused)


def test_retry_after_is_capped_at_what_sdks_honour() -> None:
    clock = Clock()
    adm = Admission(queue_bound=64, max_inflight=1, clock=clock, prior_hold_s=30.0,
                    interactive_wait_s=1.5)
    got = _interactive_burst(adm, 10)
    assert max(got) == pytest.approx(60.0)
    assert all(r <= 60.0 for r in got)


def test_hold_estimate_follows_the_age_of_requests_holding_slots() -> None:
    clock = Clock()

    async def go() -> None:
        adm = Admission(queue_bound=8, max_inflight=2, clock=clock, prior_hold_s=1.0)
        a, b = await adm.acquire(), await adm.acquire()
        clock.t += 12.0
        assert adm.hold_estimate_s() == pytest.approx(12.0)
        adm.release(a)
        adm.release(b)
        assert adm.hold_estimate_s() < 12.0

    run(go())


def test_a_starting_worker_counts_as_capacity_that_is_coming() -> None:
    clock = Clock()
    slow = Admission(queue_bound=64, max_inflight=2, clock=clock, prior_hold_s=10.0)
    fast = Admission(queue_bound=64, max_inflight=2, clock=clock, prior_hold_s=10.0)
    fast.capacity_coming([(clock.t + 5.0, 8)])
    # 20 ahead at 2 slots of 10 s: 100 s. With 8 more slots from t+5: 5 s gets 1 out,
    # the other 19 go at 10 slots: 19 s more.
    assert slow._wait_for(20) == pytest.approx(100.0)
    assert fast._wait_for(20) == pytest.approx(5.0 + 19 * 10.0 / 10)
    fast.capacity_coming([(clock.t - 1.0, 8)])  # overdue: counts as there
    assert fast._wait_for(20) == pytest.approx(20.0)


def test_a_retried_interactive_request_is_queued_not_refused_again() -> None:
    clock = Clock()

    async def go() -> None:
        adm = Admission(queue_bound=4, max_inflight=1, clock=clock, prior_hold_s=30.0,
                        interactive_wait_s=1.5)
        held = await adm.acquire()
        with pytest.raises(QueueFull):
            await adm.acquire()
        back = asyncio.create_task(adm.acquire(retried=True))
        await asyncio.sleep(0)
        assert adm.queued == 1 and not back.done()
        adm.release(held)
        adm.release(await back)
        # The queue bound still holds for retried requests.
        held = await adm.acquire()
        waiting = [asyncio.create_task(adm.acquire(retried=True)) for _ in range(4)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await adm.acquire(retried=True)
        adm.release(held)
        for w in waiting:
            adm.release(await w)

    run(go())


def test_capacity_down_queues_what_can_be_answered_within_the_limit() -> None:
    """12 closed-loop clients on one worker's 8 slots (the other worker dead):
    the 4 extra wait about one hold each, far inside a 60 s limit, so none is
    refused; only a wait past the limit is refused, with Retry-After."""
    clock = Clock()

    async def go() -> None:
        adm = Admission(queue_bound=64, max_inflight=8, clock=clock, prior_hold_s=5.0,
                        wait_limit_s=60.0)
        held = [await adm.acquire() for _ in range(8)]
        queued = [asyncio.create_task(adm.acquire()) for _ in range(4)]
        await asyncio.sleep(0)
        assert adm.queued == 4 and adm.rejected == 0
        # 60 more wait at most 64 / 8 holds (40 s), then need two holds (10 s): all queued.
        more = [asyncio.create_task(adm.acquire()) for _ in range(60)]
        await asyncio.sleep(0)
        assert adm.queued == 64 and adm.rejected == 0
        with pytest.raises(QueueFull):  # the queue bound still bounds memory
            await adm.acquire()
        assert adm.refused_by["queue_bound"] == 1 and adm.refused_by["limit"] == 0
        for t in more:
            t.cancel()
        await asyncio.gather(*more, return_exceptions=True)
        slow = Admission(queue_bound=64, max_inflight=1, clock=clock, prior_hold_s=20.0,
                         wait_limit_s=60.0)
        h = await slow.acquire()
        waiter = asyncio.create_task(slow.acquire())  # waits 20 s, two holds left: queued
        await asyncio.sleep(0)
        assert slow.queued == 1
        with pytest.raises(QueueFull) as info:  # 40 s of wait, then 40 s: past the limit
            await slow.acquire("batch")
        assert slow.refused_by["limit"] == 1 and info.value.retry_after_s >= 1
        slow.release(h)
        slow.release(await waiter)
        for ticket in held:
            adm.release(ticket)
        for t in queued:
            adm.release(await t)

    asyncio.run(go())


def test_a_waiter_the_prediction_failed_is_refused_before_its_limit() -> None:
    """Queued to start within 0.1 s, it is still waiting when fewer than two
    service times are left before its limit: 429 with Retry-After, not a timeout."""
    clock = Clock()

    async def go() -> None:
        adm = Admission(queue_bound=8, max_inflight=1, clock=clock, prior_hold_s=0.1,
                        wait_limit_s=0.5)
        held = await adm.acquire()
        waiter = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        assert adm.queued == 1
        clock.t = 0.35  # the holder is still there, past its expected hold
        with pytest.raises(QueueFull):
            await asyncio.wait_for(waiter, 2)
        assert adm.refused_by["limit"] == 1 and adm.queued == 0
        adm.release(held)

    asyncio.run(go())
