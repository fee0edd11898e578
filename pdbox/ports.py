"""Port allocation without collisions, and clear errors for ports already taken.

Workers listen on ports pdbox picks before they start. A port from the
kernel's ephemeral range (what binding port 0 gives) can be taken in between
by any outgoing connection on the machine, a worker's own included: a vLLM
worker once failed its NIXL handshake listener with "Address already in use"
that way. So listening ports come from a pool outside that range, which the
kernel never hands to an outgoing connection, and each is bind-tested when
handed out.
"""

from __future__ import annotations

import errno
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Linux's own default, for a kernel whose range file cannot be read.
LINUX_EPHEMERAL = (32768, 60999)
# The usual pool: above the ports services commonly take (8000, 8080, 9090...,
# pdbox's own router among them) and below Kubernetes' NodePorts (30000-32767).
PREFERRED_POOL = (20000, 29999)
# No pool reaches below this, whatever the ephemeral range.
POOL_FLOOR = 10000
MIN_POOL_SIZE = 1000


class PortTaken(Exception):
    """str() names the port and what wanted it."""


def check_free(host: str, port: int, what: str) -> None:
    """Raise PortTaken if `port` cannot be bound on `host`.

    A port in use, a host that is not an address of this machine and a port
    that needs privileges each get their own sentence: "already in use" for
    all three would send the user looking for a process that does not exist.
    """
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortTaken(f"cannot listen on {host} ({what}): {exc.strerror}; "
                        "choose another address with --host") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the server will: a port left in TIME_WAIT by a previous run is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortTaken(
                    f"port {port} on {host} ({what}) is already in use; "
                    "stop what holds it or choose another with --port"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise PortTaken(f"cannot listen on {host} ({what}): it is not an address of "
                                "this machine; choose another with --host") from None
            raise PortTaken(f"cannot listen on port {port} on {host} ({what}): {exc.strerror}; "
                            "choose another with --port") from None


def is_free(host: str, port: int) -> bool:
    """True when `port` can be bound on `host` now (check_free without the sentence)."""
    try:
        check_free(host, port, "")
    except PortTaken:
        return False
    return True


def ephemeral_range(path: Path = RANGE_FILE) -> tuple[int, int]:
    """The kernel's ephemeral port range, inclusive; Linux's default when the
    file is missing or holds something that is not a range."""
    try:
        lo, hi = (int(v) for v in path.read_text(encoding="ascii").split())
    except (OSError, ValueError):
        return LINUX_EPHEMERAL
    if not 1 <= lo <= hi <= 65535:
        return LINUX_EPHEMERAL
    return lo, hi


def listen_pool(ephemeral: tuple[int, int]) -> range:
    """Where listening ports come from, given the ephemeral range (inclusive).

    Below the range in the usual case; above it when the range starts low;
    what is left below it (down to POOL_FLOOR) when it runs to the top. A
    range that leaves no MIN_POOL_SIZE ports outside it gets the preferred
    pool anyway: then the bind test when a port is handed out is all that
    guards it.
    """
    lo, hi = ephemeral
    pref_lo, pref_hi = PREFERRED_POOL
    for pool in (range(pref_lo, min(pref_hi + 1, lo)),
                 range(max(hi + 1, pref_lo), 65536),
                 range(POOL_FLOOR, lo)):
        if len(pool) >= MIN_POOL_SIZE:
            return pool
    return range(pref_lo, pref_hi + 1)


def candidates(pool: range, start: int) -> Iterator[int]:
    """Every port of `pool` once, from `start` on, wrapping round to its beginning."""
    if not pool:
        return
    first = pool.index(start) if start in pool else 0
    for i in range(len(pool)):
        yield pool[(first + i) % len(pool)]

class PortAllocator:
    """Hands out free ports for listeners, never the same one twice in a run.

    Ports come from `pool` (default: outside the kernel's ephemeral range),
    each bind-tested on `host` when handed out. The walk starts at a random
    port of the pool, so two pdbox runs (or test sessions) at once do not
    offer each other the same ports in step.
    """

    def __init__(self, host: str = "127.0.0.1", reserved: set[int] | None = None, *,
                 pool: range | None = None, start: int | None = None) -> None:
        self.host = host
        self.given: set[int] = set(reserved or ())
        self.pool = pool if pool is not None else listen_pool(ephemeral_range())
        if not self.pool:
            raise ValueError("the port pool is empty")
        self._next = start if start is not None else self.pool[secrets.randbelow(len(self.pool))]

    def take(self) -> int:
        for port in candidates(self.pool, self._next):
            if port in self.given or not is_free(self.host, port):
                continue
            self.given.add(port)
            self._next = port + 1
            return port
        raise PortTaken(f"no free port left in {self.pool[0]}-{self.pool[-1]} on {self.host}")

    def keep_or_replace(self, port: int) -> int:
        """`port` while it can still be bound, else a fresh one (0, "none", stays 0).

        For a worker about to start again: something may have taken its port
        since it was handed out.
        """
        if port == 0 or is_free(self.host, port):
            return port
        return self.take()
