"""Ports: a taken port is named in one sentence; the allocator never repeats itself."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from pdbox import ports
from pdbox.ports import PortAllocator, PortTaken, check_free


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


# ------------------------------------------------------------------ allocator


def test_allocator_never_repeats_and_gives_bindable_ports() -> None:
    alloc = PortAllocator()
    got = [alloc.take() for _ in range(200)]
    assert len(set(got)) == 200
    for port in got[:20]:
        check_free("127.0.0.1", port, "x")


class _KernelSays:
    """socket.socket stand-in whose kernel picks the ports in `answers`, in turn."""

    def __init__(self, answers: list[int]) -> None:
        self.answers = answers
        self.asked = 0

    def __call__(self, *a: object) -> _KernelSays:
        return self

    def __enter__(self) -> _KernelSays:
        return self

    def __exit__(self, *a: object) -> None:
        pass

    def bind(self, addr: tuple[str, int]) -> None:
        assert addr[1] == 0

    def getsockname(self) -> tuple[str, int]:
        port = self.answers[min(self.asked, len(self.answers) - 1)]
        self.asked += 1
        return ("127.0.0.1", port)


def test_allocator_skips_a_port_the_kernel_offers_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = _KernelSays([41000, 41000, 41000, 41001])
    monkeypatch.setattr(ports.socket, "socket", kernel)
    alloc = PortAllocator()
    assert alloc.take() == 41000
    assert alloc.take() == 41001
    assert kernel.asked == 4


def test_allocator_skips_reserved_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports.socket, "socket", _KernelSays([8000, 41002]))
    assert PortAllocator(reserved={8000}).take() == 41002


def test_allocator_gives_up_with_a_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports.socket, "socket", _KernelSays([41000]))
    alloc = PortAllocator(reserved={41000})
    with pytest.raises(PortTaken, match="could not find a free port"):
        alloc.take()
