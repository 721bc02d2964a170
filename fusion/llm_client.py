"""A client for OpenAI-compatible chat-completions endpoints that take images (vLLM, Ollama's ``/v1``, hosted APIs).

The fusion node asks a multimodal LLM what a camera shows: the question and one or more camera frames go
out as one user turn (frames as base64 JPEG ``data:`` URLs), the answer comes back as Server-Sent Events and
is handed on piece by piece as it arrives, so a console or speech output can start before the model has
finished. Endpoints that ignore ``"stream": true`` and answer one JSON completion work too.

Every failure (endpoint down, HTTP error, no answer in time, a response that is not the protocol) is one
:class:`LlmError` whose message names the endpoint and what went wrong.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit

import aiohttp
import cv2
import numpy as np

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You look through the cameras of a robot or vehicle. Describe what the images show that matters for the "
    "question, and answer briefly, in one to three sentences. Say so when the images do not show it."
)

_CHAT_PATH = "/chat/completions"
_ERROR_BODY_CHARS = 300  # how much of a non-JSON error body goes into an LlmError


class LlmError(RuntimeError):
    """An LLM endpoint could not be reached or did not answer as the protocol says; the message names it."""


@dataclass
class LlmConfig:
    """Where the LLM is and how long to wait for it."""

    url: str
    """``http://host:port``, ``http://host:port/v1`` or the full ``.../v1/chat/completions`` URL."""
    model: str
    """Model name the endpoint serves (``"Qwen/Qwen2.5-VL-7B-Instruct"``, ``"llava"``)."""
    api_key: str | None = None
    """Sent as ``Authorization: Bearer``; None for local servers that need none."""
    timeout_s: float = 60.0
    """The whole answer must have arrived this long after the request started."""
    first_token_timeout_s: float = 20.0
    """The first piece of the answer must have arrived this long after the request started."""
    max_tokens: int = 300
    """Upper bound on the answer's length, in tokens."""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    """The system turn sent first; an empty string sends none."""


def chat_completions_url(url: str) -> str:
    """Returns the full chat-completions URL for an endpoint given as a base, ``/v1`` or full URL.

    ``http://host:8000``, ``http://host:8000/v1`` and ``http://host:8000/v1/chat/completions`` all give the
    last. A base with another path (``https://api.example.com/openai``) gets ``/v1/chat/completions`` added.

    Raises:
        ValueError: the URL is not http(s) or has no host.
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"LLM URL {url!r} is not an http:// or https:// URL with a host")
    path = parts.path.rstrip("/")
    if path.endswith(_CHAT_PATH):
        pass
    elif path.endswith("/v1"):
        path += _CHAT_PATH
    else:
        path += "/v1" + _CHAT_PATH
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc}{path}{query}"


def jpeg_data_url(image_rgb: np.ndarray, quality: int = 85) -> str:
    """Encodes an RGB image as a ``data:image/jpeg;base64,...`` URL, the form chat endpoints take images in.

    Args:
        image_rgb: [H, W, 3] uint8, RGB channel order.
        quality: JPEG quality, 1 to 100.

    Raises:
        ValueError: the array is not [H, W, 3] uint8, or quality is out of range.
    """
    if not isinstance(image_rgb, np.ndarray) or image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 \
            or image_rgb.shape[2] != 3 or image_rgb.shape[0] == 0 or image_rgb.shape[1] == 0:
        shape = getattr(image_rgb, "shape", None)
        dtype = getattr(image_rgb, "dtype", type(image_rgb).__name__)
        raise ValueError(f"image must be a non-empty [H, W, 3] uint8 RGB array, got shape {shape} dtype {dtype}")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be 1 to 100, got {quality}")
    image_bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)  # OpenCV encodes BGR
    ok, jpeg = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image_rgb.shape} image as JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(jpeg.tobytes()).decode("ascii")


def build_messages(question: str, images: Sequence[str], history: Iterable[dict],
                   system_prompt: str) -> list[dict]:
    """Builds the OpenAI ``messages`` list: system turn, earlier turns as text, then the question with images.

    Args:
        question: the user's question for this turn.
        images: image URLs (usually from :func:`jpeg_data_url`), sent with this turn only.
        history: earlier turns, ``{"role": "user" | "assistant", "content": str}``; their images are not resent.
        system_prompt: the system turn; empty sends none.

    Raises:
        ValueError: a history turn has another role or non-text content.
    """
    messages: list[dict] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for index, turn in enumerate(history):
        role, content = turn.get("role"), turn.get("content")
        if role not in ("user", "assistant") or not isinstance(content, str):
            raise ValueError(f"history turn {index} must be {{'role': 'user'|'assistant', 'content': str}}, "
                             f"got role {role!r} content {type(content).__name__}")
        messages.append({"role": role, "content": content})
    content_parts: list[dict] = [{"type": "text", "text": question}]
    content_parts += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    messages.append({"role": "user", "content": content_parts})
    return messages


class LlmClient:
    """Asks an OpenAI-compatible chat-completions endpoint questions about images, streaming the answer.

    One request per :meth:`stream` or :meth:`ask`; calls may run concurrently over the shared session.
    Timeouts are measured from the start of the request: the first piece of the answer within
    ``first_token_timeout_s`` (this covers connecting and the model's prefill), all of it within ``timeout_s``.

    ``counters`` holds ``requests`` (started), ``answers`` (completed) and ``errors`` (ended in an
    :class:`LlmError`), for the launcher's stats.

    Args:
        config: endpoint, model and timeouts.
        session: an aiohttp session to use; None makes one on first use, which :meth:`close` closes.
    """

    def __init__(self, config: LlmConfig, session: aiohttp.ClientSession | None = None) -> None:
        self.config = config
        self.url = chat_completions_url(config.url)
        self.counters = {"requests": 0, "answers": 0, "errors": 0}
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> LlmClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the session if this client made it; a session passed in is left to its owner."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def ask(self, question: str, images: Sequence[str], history: Iterable[dict] = ()) -> str:
        """Returns the whole answer; see :meth:`stream`."""
        return "".join([piece async for piece in self.stream(question, images, history)])

    async def stream(self, question: str, images: Sequence[str],
                     history: Iterable[dict] = ()) -> AsyncIterator[str]:
        """Yields the answer's text pieces as they arrive.

        Args:
            question: the question for this turn.
            images: image URLs for this turn (:func:`jpeg_data_url`).
            history: earlier text turns (see :func:`build_messages`).

        Raises:
            LlmError: endpoint unreachable, HTTP error, a timeout, or a malformed response.
        """
        payload = {"model": self.config.model, "stream": True, "max_tokens": self.config.max_tokens,
                   "messages": build_messages(question, images, history, self.config.system_prompt)}
        self.counters["requests"] += 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        pieces = self._request(payload)
        first = True
        try:
            while True:
                limit_s = min(self.config.first_token_timeout_s, self.config.timeout_s) if first \
                    else self.config.timeout_s
                try:
                    # The timeout covers only the wait for the next piece, never the consumer's work at the yield.
                    async with asyncio.timeout_at(started + limit_s):
                        piece = await anext(pieces)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    what = "first piece of the answer" if first else "whole answer"
                    raise LlmError(f"LLM endpoint {self.url} timed out: no {what} within {limit_s:g} s") from None
                first = False
                yield piece
        except LlmError:
            self.counters["errors"] += 1
            raise
        finally:
            await pieces.aclose()
        self.counters["answers"] += 1

    async def _request(self, payload: dict) -> AsyncIterator[str]:
        """Posts the request and yields answer pieces, with no timeouts of its own (:meth:`stream` keeps them)."""
        headers = {"Accept": "text/event-stream, application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.post(self.url, json=payload, headers=headers,
                                          timeout=aiohttp.ClientTimeout(total=None)) as response:
                if response.status >= 400:
                    raise LlmError(f"LLM endpoint {self.url} answered HTTP {response.status}: "
                                   f"{await _error_message(response)}")
                if response.content_type == "application/json":
                    yield _message_content(await self._json_body(response), self.url)
                else:
                    async for piece in _sse_pieces(response, self.url):
                        yield piece
        except aiohttp.ClientConnectorError as exc:
            raise LlmError(f"LLM endpoint {self.url} is unreachable: {exc.os_error or exc}") from exc
        except aiohttp.ClientError as exc:
            raise LlmError(f"LLM endpoint {self.url} request failed: {type(exc).__name__}: {exc}") from exc

    async def _json_body(self, response: aiohttp.ClientResponse) -> dict:
        try:
            body = json.loads(await response.text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LlmError(f"LLM endpoint {self.url} sent malformed JSON: {exc}") from exc
        return body


async def _error_message(response: aiohttp.ClientResponse) -> str:
    """The server's own error message: OpenAI's ``{"error": {"message": ...}}``, or the start of the body."""
    text = await response.text(errors="replace")
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()[:_ERROR_BODY_CHARS] or response.reason or "(empty body)"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str):
        return error  # some servers (older Ollama) send {"error": "..."}
    return text.strip()[:_ERROR_BODY_CHARS]


def _message_content(body: object, url: str) -> str:
    """``choices[0].message.content`` of a non-streamed completion."""
    try:
        content = body["choices"][0]["message"]["content"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        raise LlmError(f"LLM endpoint {url} sent a malformed completion: no choices[0].message.content "
                       f"in {str(body)[:_ERROR_BODY_CHARS]}") from None
    return content or ""


async def _sse_pieces(response: aiohttp.ClientResponse, url: str) -> AsyncIterator[str]:
    """Yields ``choices[0].delta.content`` of each Server-Sent Event until ``data: [DONE]`` or the stream ends."""
    data_lines: list[str] = []
    events = 0
    async for raw_line in response.content:
        line = raw_line.decode("utf-8", errors="replace").rstrip("\r\n")
        if line.startswith("data:"):
            data_lines.append(line[5:].removeprefix(" "))
            continue
        if line or not data_lines:
            continue  # comments (":"), "event:"/"id:" fields, or a blank line with no event pending
        data, data_lines = "\n".join(data_lines), []
        events += 1
        if data.strip() == "[DONE]":
            return
        piece = _delta_content(data, url)
        if piece:
            yield piece
    if data_lines and "\n".join(data_lines).strip() != "[DONE]":
        piece = _delta_content("\n".join(data_lines), url)  # last event without its blank line
        if piece:
            yield piece
    elif not data_lines and events == 0:
        raise LlmError(f"LLM endpoint {url} answered {response.content_type or 'no content type'} "
                       "with no Server-Sent Events and no JSON completion")


def _delta_content(data: str, url: str) -> str:
    """The text of one streamed chunk; empty for chunks that carry only a role, a finish reason or usage."""
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError as exc:
        raise LlmError(f"LLM endpoint {url} sent a malformed stream event {data[:80]!r}: {exc}") from exc
    if not isinstance(chunk, dict):
        raise LlmError(f"LLM endpoint {url} sent a stream event that is not an object: {data[:80]!r}")
    if "error" in chunk:  # vLLM reports errors found mid-stream this way
        error = chunk["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        raise LlmError(f"LLM endpoint {url} reported an error mid-answer: {message}")
    choices = chunk.get("choices")
    if not choices:
        return ""
    try:
        return choices[0].get("delta", {}).get("content") or ""
    except AttributeError:
        raise LlmError(f"LLM endpoint {url} sent a malformed stream chunk: {data[:_ERROR_BODY_CHARS]}") from None
