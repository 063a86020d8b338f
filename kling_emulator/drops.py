"""Connections that die on purpose (fault injection), quietly: no 500, no status line, no traceback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

_CYCLE = "kling_emulator.cycle"  # scope key: uvicorn's per-request cycle, which owns the transport


class DroppedConnection(Response):
    """Sends `partial` (if any) and then closes the connection: the client sees it die (httpx raises
    RemoteProtocolError), with or without a status line.

    Closing the transport ourselves, and waiting until uvicorn has seen the disconnect, keeps uvicorn from
    answering 500 or logging an error for an injected fault. Without uvicorn's cycle (another server) it falls
    back to starting a response and raising, which also kills the connection, only noisily.
    `sent` (if given) is told how many body bytes went out.
    """

    def __init__(self, partial: bytes | None = None, total: int = 0, content_type: str = "application/json",
                 sent: Callable[[int], None] | None = None):
        super().__init__()
        self.partial, self.total, self.kind, self.sent = partial, total, content_type, sent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cycle = scope.get(_CYCLE)
        if self.partial is not None or cycle is None:
            headers = [(b"content-length", str(max(self.total, 1000)).encode()),
                       (b"content-type", self.kind.encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": self.partial or b"{", "more_body": True})
            if self.sent is not None and self.partial:
                self.sent(len(self.partial))
        if cycle is None:
            raise ConnectionAbortedError("kling-emulator: connection dropped on purpose (fault injection)")
        cycle.transport.close()  # flushes what was sent, then FIN
        for _ in range(200):
            if getattr(cycle, "disconnected", True):
                return
            await asyncio.sleep(0.005)


def expose_cycle(app: Any) -> Any:
    """Outermost ASGI layer: remember uvicorn's request cycle (the owner of its bound `send`)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        owner = getattr(send, "__self__", None)
        if scope["type"] == "http" and hasattr(owner, "transport"):
            scope[_CYCLE] = owner
        await app(scope, receive, send)

    return wrapped
