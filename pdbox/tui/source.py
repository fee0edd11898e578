"""What the TUI needs from a running pdbox. `pdbox.control_client.ControlClient`
satisfies it over HTTP; tests pass a fake that records the calls."""

from __future__ import annotations

from typing import Any, Protocol


class StatusSource(Protocol):
    """Optional attributes, read with getattr: `chat_url` (the OpenAI endpoint, used until
    a snapshot names one) and `model` (the chat pane's model; else the first of /v1/models)."""

    async def status(self) -> dict[str, Any]: ...

    async def scale(self, role: str, replicas: int | str) -> Any: ...

    async def set_policy(self, policy: str) -> Any: ...

    async def restart(self, worker_id: str) -> Any: ...

    async def logs(self, worker_id: str, lines: int = 200) -> list[str]: ...

    async def shutdown(self) -> Any: ...
