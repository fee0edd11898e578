"""Ports: a taken port is named in one sentence; the allocator hands out ports from
outside the kernel's ephemeral range, each free when handed out, never twice."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdbox.ports import (
    LINUX_EPHEMERAL,
    PortAllocator,
    PortTaken,
    candidates,
    check_free,
    ephemeral_range,
    is_free,
    listen_pool,
)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s
    s.close()


def test_a_listening_port_is_taken(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    with pytest.raises(PortTaken) as err:
        check_free("127.0.0.1", port, "the OpenAI endpoint")
    assert str(err.value) == (f"port {port} on 127.0.0.1 (the OpenAI endpoint) is already in use; "
                              "stop what holds it or choose another with --port")


def test_a_port_held_on_loopback_is_taken_for_all_addresses(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    with pytest.raises(PortTaken, match=f"port {port} on 0.0.0.0"):
        check_free("0.0.0.0", port, "the OpenAI endpoint")


def test_a_port_held_on_all_addresses_is_taken_on_loopback() -> None:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PortTaken, match=f"port {port} on 127.0.0.1"):
            check_free("127.0.0.1", port, "x")


def test_a_bound_socket_that_does_not_listen_still_holds_the_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        with pytest.raises(PortTaken):
            check_free("127.0.0.1", s.getsockname()[1], "x")


def test_a_free_port_passes_and_stays_free() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check_free("127.0.0.1", port, "x")
    check_free("localhost", port, "x")
    check_free("127.0.0.1", 0, "x")  # "any port" is always possible
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # check_free did not keep it


def test_a_foreign_address_is_not_reported_as_a_taken_port() -> None:
    # 192.0.2.0/24 is reserved for documentation: never an address of this machine.
    with pytest.raises(PortTaken) as err:
        check_free("192.0.2.1", 8000, "the OpenAI endpoint")
    msg = str(err.value)
    assert "not an address of this machine" in msg and "--host" in msg
    assert "already in use" not in msg


def test_an_unknown_host_is_one_sentence() -> None:
    with pytest.raises(PortTaken) as err:
        check_free("no-such-host.invalid", 8000, "the OpenAI endpoint")
    msg = str(err.value)
    assert msg.startswith("cannot listen on no-such-host.invalid (the OpenAI endpoint): ")
    assert "already in use" not in msg and "\n" not in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root may bind any port")
def test_a_privileged_port_is_not_reported_as_taken() -> None:
    with pytest.raises(PortTaken) as err:
        check_free("127.0.0.1", 1, "x")
    assert "already in use" not in str(err.value)


# ------------------------------------------------------------- the pure rule


def _range_file(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "ip_local_port_range"
    f.write_text(text)
    return f


def test_the_ephemeral_range_is_read_from_its_file(tmp_path: Path) -> None:
    assert ephemeral_range(_range_file(tmp_path, "32768\t60999\n")) == (32768, 60999)
    assert ephemeral_range(_range_file(tmp_path, "1024 65535")) == (1024, 65535)


@pytest.mark.parametrize("text", ["", "32768", "a b", "60999 32768", "0 100", "1024 70000"])
def test_an_unreadable_range_is_linux_default(tmp_path: Path, text: str) -> None:
    assert ephemeral_range(_range_file(tmp_path, text)) == LINUX_EPHEMERAL
    assert ephemeral_range(tmp_path / "missing") == LINUX_EPHEMERAL


@pytest.mark.parametrize(("ephemeral", "pool"), [
    # Linux's default, and the range most distributions keep: below it.
    ((32768, 60999), range(20000, 30000)),
    ((49152, 65535), range(20000, 30000)),
    # A range that starts within the usual pool leaves part of it.
    ((25000, 65535), range(20000, 25000)),
    # A range that starts low: above it.
    ((1024, 30999), range(31000, 65536)),
    ((15000, 50000), range(50001, 65536)),
    # One that runs to the top from just above 20000: what is left below it.
    ((20500, 65535), range(10000, 20500)),
])
def test_the_pool_lies_outside_the_ephemeral_range(ephemeral: tuple[int, int],
                                                   pool: range) -> None:
    got = listen_pool(ephemeral)
    assert got == pool
    lo, hi = ephemeral
    assert not any(lo <= port <= hi for port in (got[0], got[-1]))
    assert 8000 not in got and got[0] >= 10000


def test_a_range_that_leaves_no_room_still_gives_a_pool() -> None:
    # Nothing outside it: the bind test at hand-out is the only guard left.
    assert listen_pool((1024, 65535)) == range(20000, 30000)


def test_candidates_walk_the_pool_once_from_the_start_and_wrap() -> None:
    assert list(candidates(range(10, 15), 13)) == [13, 14, 10, 11, 12]
    assert list(candidates(range(10, 15), 99)) == [10, 11, 12, 13, 14]
    assert list(candidates(range(10, 10), 10)) == []


# ------------------------------------------------------------------ allocator


def _held(pool: range) -> Iterator[tuple[socket.socket, int]]:
    """Listening sockets on ports of `pool`, one at a time as asked."""
    for port in pool:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        s.listen()
        yield s, port


def test_allocator_never_repeats_and_gives_bindable_ports() -> None:
    alloc = PortAllocator()
    got = [alloc.take() for _ in range(200)]
    assert len(set(got)) == 200
    assert all(port in alloc.pool for port in got)
    for port in got[:20]:
        check_free("127.0.0.1", port, "x")


def test_allocator_walks_the_pool_from_its_start() -> None:
    pool = range(24000, 24100)
    alloc = PortAllocator(pool=pool, start=24090)
    got = [alloc.take() for _ in range(20)]
    expected = [p for p in candidates(pool, 24090) if is_free("127.0.0.1", p)][:20]
    assert got == expected


def test_allocator_skips_a_port_something_holds() -> None:
    held, port = next(_held(range(24200, 24300)))
    with held:
        alloc = PortAllocator(pool=range(port, port + 50), start=port)
        assert alloc.take() != port


def test_allocator_skips_reserved_ports() -> None:
    pool = range(24300, 24400)
    free = [p for p in pool if is_free("127.0.0.1", p)]
    alloc = PortAllocator(reserved={free[0]}, pool=pool, start=free[0])
    assert alloc.take() == free[1]


def test_allocator_gives_up_with_a_sentence() -> None:
    pool = range(24400, 24403)
    alloc = PortAllocator(reserved=set(pool), pool=pool)
    with pytest.raises(PortTaken, match="no free port left in 24400-24402 on 127.0.0.1"):
        alloc.take()


def test_keep_or_replace_keeps_a_free_port_and_replaces_a_taken_one() -> None:
    alloc = PortAllocator(pool=range(24500, 24600))
    port = alloc.take()
    assert alloc.keep_or_replace(port) == port
    assert alloc.keep_or_replace(0) == 0  # "none" stays none
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        fresh = alloc.keep_or_replace(port)
    assert fresh != port and fresh in alloc.pool and fresh in alloc.given


def test_outgoing_connections_never_take_a_handed_out_port() -> None:
    """Hundreds of outgoing loopback connections held open, as workers and the
    router keep them, while ports are handed out, bound and closed: the
    connections' ports come from the ephemeral range, the allocator's never."""
    lo, hi = ephemeral_range()
    pool = listen_pool((lo, hi))
    if any(lo <= p <= hi for p in (pool[0], pool[-1])):
        pytest.skip(f"the ephemeral range {lo}-{hi} leaves no pool outside it")
    t0 = time.monotonic()
    conns: list[socket.socket] = []
    accepted: list[socket.socket] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(256)
        try:
            for _ in range(200):
                c = socket.create_connection(server.getsockname())
                conns.append(c)
                accepted.append(server.accept()[0])
            alloc = PortAllocator()
            errors: list[str] = []
            handed: list[int] = []
            for _ in range(200):
                port = alloc.take()
                handed.append(port)
                with socket.socket() as s:  # no SO_REUSEADDR: as strict as a listener gets
                    try:
                        s.bind(("127.0.0.1", port))
                        s.listen()
                    except OSError as exc:
                        errors.append(f"{port}: {exc}")
        finally:
            for c in conns + accepted:
                c.close()
    assert errors == []
    assert not [p for p in handed if lo <= p <= hi]
    assert len(set(handed)) == 200
    assert time.monotonic() - t0 < 10
