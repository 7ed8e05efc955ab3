"""Request body limit enforced while the body streams in, before any of it is parsed or spooled to disk."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Pure ASGI middleware: 413 on a Content-Length over the limit, or once the streamed bytes pass it.

    `max_bytes` is the body limit: the largest image, `image_bytes` (RETRIEVAL_MAX_UPLOAD_BYTES), plus room for
    the multipart framing and the form fields. The 413 names the image limit, the number a user set and can act
    on, not the body limit."""

    def __init__(self, app: ASGIApp, max_bytes: int, image_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.image_bytes = image_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send, int(declared), exact=True)
            return

        received = 0
        response_started = False
        rejected = False

        async def limited_receive() -> Message:
            nonlocal received, response_started, rejected
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Answered here, once, whatever the app makes of the exception next (FastAPI turns a failed
                    # form read into an HTTP error of its own): every 413 for size says the same thing.
                    if not response_started:
                        response_started = rejected = True
                        await self._reject(send, received, exact=False)
                    raise BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if rejected:  # the 413 is already sent: the app's own answer to the exception is dropped
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not response_started:
                await self._reject(send, received, exact=False)

    async def _reject(self, send: Send, size: int, exact: bool) -> None:
        limit = self.image_bytes
        body = json.dumps({
            "error": "payload_too_large",
            "message": f"the upload is too large: an image may be at most {limit} bytes ({_readable(limit)}, "
                       f"RETRIEVAL_MAX_UPLOAD_BYTES), and this request's body is {'' if exact else 'at least '}"
                       f"{size} bytes",
            "detail": {"max_upload_bytes": limit, "request_bytes": size},
        }).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _readable(size: int) -> str:
    return f"{size / 2**20:.3g} MiB" if size >= 2**20 else f"{size / 2**10:.3g} KiB"
