"""Port allocation without collisions, and clear errors for ports already taken."""

from __future__ import annotations

import errno
import socket


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


class PortAllocator:
    """Hands out free loopback ports, never the same one twice in a run."""

    def __init__(self, host: str = "127.0.0.1", reserved: set[int] | None = None):
        self.host = host
        self.given: set[int] = set(reserved or ())

    def take(self) -> int:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((self.host, 0))
                port = s.getsockname()[1]
            if port not in self.given:
                self.given.add(port)
                return port
        raise PortTaken("could not find a free port on loopback")
