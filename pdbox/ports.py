"""Port allocation without collisions, and clear errors for ports already taken."""

from __future__ import annotations

import socket


class PortTaken(Exception):
    """str() names the port and what wanted it."""


def check_free(host: str, port: int, what: str) -> None:
    """Raise PortTaken if `port` cannot be bound on `host`."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise PortTaken(
                f"port {port} on {host} ({what}) is already in use; "
                "stop what holds it or choose another with --port"
            ) from None


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
