"""A fake OpenAI-compatible chat-completions server, for tests and demos without a real LLM.

:class:`FakeLlm` speaks the protocol :mod:`fusion.llm_client` uses (``POST /v1/chat/completions``,
Server-Sent Events when ``"stream": true``, else one JSON completion), records every request it gets, and
answers deterministically from what it received (:func:`fake_answer`), so a test can check both what the
client sent and what it made of the answer. Knobs make it slow (``delay_s``, ``piece_delay_s``) or failing
(``fail_status``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
from aiohttp import web

log = logging.getLogger(__name__)

_DATA_URL_PREFIX = "data:"
_PIECES = 4  # the answer is streamed in about this many pieces


@dataclass(frozen=True)
class FakeLlmRequest:
    """One request as :class:`FakeLlm` received it."""

    received_monotonic_s: float
    """``time.monotonic()`` when the request arrived."""
    model: str
    """The ``model`` field; empty if the request had none."""
    question: str
    """Text of the last user turn (its text parts joined by spaces)."""
    image_sizes: list[tuple[int, int] | None] = field(default_factory=list)
    """(height, width) of each image in the last user turn, None for one that does not decode as an image."""
    body: dict | None = None
    """The request's JSON; None if it was not a JSON object."""
    authorization: str | None = None
    """The ``Authorization`` header, if any."""

    @property
    def num_images(self) -> int:
        """How many images the last user turn carried."""
        return len(self.image_sizes)


def fake_answer(question: str, image_sizes: list[tuple[int, int] | None]) -> str:
    """The answer :class:`FakeLlm` gives: ``"I see 1 image (320x240). You asked: <question>"`` (width x height)."""
    sizes = ", ".join("undecodable" if size is None else f"{size[1]}x{size[0]}" for size in image_sizes)
    count = "no images" if not image_sizes else f"{len(image_sizes)} image{'s' if len(image_sizes) > 1 else ''}"
    seen = f"I see {count} ({sizes})." if image_sizes else f"I see {count}."
    return f"{seen} You asked: {question}"


def split_pieces(text: str, count: int = _PIECES) -> list[str]:
    """Splits ``text`` into up to ``count`` consecutive non-empty pieces, at word boundaries where it can."""
    words = text.split(" ")
    per_piece = max(1, -(-len(words) // count))
    groups = [words[i:i + per_piece] for i in range(0, len(words), per_piece)]
    pieces = [" ".join(group) for group in groups]
    return [piece if i == len(pieces) - 1 else piece + " " for i, piece in enumerate(pieces)]


class FakeLlm:
    """An aiohttp server answering OpenAI-style chat completions deterministically.

    Serves ``POST /v1/chat/completions`` (and ``/chat/completions``). Each well-formed request is appended
    to ``requests`` before any delay, so a test can wait for it with :meth:`wait_for_requests` while the
    answer is still held back. Malformed ones (not JSON, no ``messages``) get HTTP 400 with an OpenAI-style
    error body and are recorded too.

    Attributes, changeable between requests:
        delay_s: seconds to wait before answering (a slow endpoint); :meth:`stop` cuts the wait short.
        piece_delay_s: seconds between streamed pieces (a slow generation).
        fail_status: answer every request with this HTTP status and ``fail_message`` instead.
        fail_message: the error message sent with ``fail_status``.
        ignore_stream: answer one JSON completion even when the request asks for a stream, as some
            servers do.
    """

    def __init__(self, *, delay_s: float = 0.0, piece_delay_s: float = 0.0, fail_status: int | None = None,
                 fail_message: str = "fake LLM failure", ignore_stream: bool = False) -> None:
        self.delay_s = delay_s
        self.piece_delay_s = piece_delay_s
        self.fail_status = fail_status
        self.fail_message = fail_message
        self.ignore_stream = ignore_stream
        self.requests: list[FakeLlmRequest] = []
        self._arrived = asyncio.Event()
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._host = ""
        self._port = 0

    @property
    def url(self) -> str:
        """The base URL clients take, ``http://host:port/v1``."""
        if self._runner is None:
            raise RuntimeError("FakeLlm has no URL before start()")
        return f"http://{self._host}:{self._port}/v1"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Starts serving; returns the bound port (a free one when ``port`` is 0)."""
        if self._runner is not None:
            raise RuntimeError(f"FakeLlm already serving at {self.url}")
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/chat/completions", self._handle)
        # A short shutdown timeout: a test must not wait on a handler that is still streaming.
        runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner, self._host = runner, host
        self._port = runner.addresses[0][1]
        self._stopping.clear()
        log.debug("fake LLM serving at %s", self.url)
        return self._port

    async def stop(self) -> None:
        """Stops serving; waiting requests are cut short. Safe to call twice."""
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeLlm:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def wait_for_requests(self, n: int, timeout_s: float = 5.0) -> list[FakeLlmRequest]:
        """Waits until at least ``n`` requests have arrived; returns them all.

        Raises:
            TimeoutError: fewer than ``n`` arrived within ``timeout_s``.
        """
        try:
            async with asyncio.timeout(timeout_s):
                while len(self.requests) < n:
                    self._arrived.clear()  # no await between the check and the clear, so no arrival is missed
                    await self._arrived.wait()
        except TimeoutError:
            raise TimeoutError(f"FakeLlm got {len(self.requests)} of {n} requests within {timeout_s:g} s") from None
        return list(self.requests)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body, problem = await _read_body(request)
        recorded = _record(body, request.headers.get("Authorization"))
        self.requests.append(recorded)
        self._arrived.set()
        if problem:
            return _error_response(400, problem, "invalid_request_error")
        if self.delay_s > 0 and await self._cut_short(self.delay_s):
            return _error_response(503, "fake LLM is stopping", "server_error")
        if self.fail_status is not None:
            return _error_response(self.fail_status, self.fail_message, "server_error")
        answer = fake_answer(recorded.question, recorded.image_sizes)
        assert body is not None  # no problem means a parsed body
        if body.get("stream") and not self.ignore_stream:
            return await self._stream_answer(request, recorded.model, answer)
        return web.json_response(_completion(recorded.model, answer))

    async def _stream_answer(self, request: web.Request, model: str, answer: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        chunks = [{"role": "assistant", "content": ""}] + [{"content": piece} for piece in split_pieces(answer)]
        for index, delta in enumerate(chunks):
            if index > 1 and self.piece_delay_s > 0 and await self._cut_short(self.piece_delay_s):
                return response
            await response.write(_sse(_chunk(model, delta, None)))
        await response.write(_sse(_chunk(model, {}, "stop")))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _cut_short(self, wait_s: float) -> bool:
        """Waits ``wait_s``; True if :meth:`stop` was called meanwhile."""
        try:
            await asyncio.wait_for(self._stopping.wait(), wait_s)
        except TimeoutError:
            return False
        return True


async def _read_body(request: web.Request) -> tuple[dict | None, str | None]:
    """The request's JSON object and, if it is not a usable chat request, what is wrong with it."""
    try:
        body = json.loads(await request.text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"request body is not JSON: {exc}"
    if not isinstance(body, dict):
        return None, "request body must be a JSON object"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return body, "'messages' must be a non-empty list of message objects"
    return body, None


def _record(body: dict | None, authorization: str | None) -> FakeLlmRequest:
    """What a request asked: model, last user turn's text and image sizes."""
    model = body.get("model") if body else None
    messages = body.get("messages") if body else None
    user_turns = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"] \
        if isinstance(messages, list) else []
    content = user_turns[-1].get("content") if user_turns else ""
    if isinstance(content, str):
        question, image_sizes = content, []
    else:
        parts = [part for part in content or [] if isinstance(part, dict)]
        question = " ".join(str(part.get("text", "")) for part in parts if part.get("type") == "text")
        image_sizes = [_image_size(part.get("image_url")) for part in parts if part.get("type") == "image_url"]
    return FakeLlmRequest(received_monotonic_s=time.monotonic(), model=model if isinstance(model, str) else "",
                          question=question, image_sizes=image_sizes, body=body, authorization=authorization)


def _image_size(image_url: object) -> tuple[int, int] | None:
    """(height, width) of a base64 ``data:`` image URL; None if it is not one or does not decode."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url.startswith(_DATA_URL_PREFIX) or ";base64," not in url:
        return None
    try:
        data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        return None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    return None if image is None else (int(image.shape[0]), int(image.shape[1]))


def _error_response(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


def _chunk(model: str, delta: dict, finish_reason: str | None) -> dict:
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def _completion(model: str, answer: str) -> dict:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": len(answer.split()),
                      "total_tokens": len(answer.split())}}


def _sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()
