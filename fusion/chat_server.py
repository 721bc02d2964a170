"""AI video chat: a browser's (or a robot's) camera over WebRTC to a multimodal LLM.

``ChatServer`` serves the page (``GET /``), answers WebRTC offers (``POST /offer``, JSON ``{"sdp", "type"}``;
400 with ``{"error"}`` naming what is wrong with a malformed one) and holds one :class:`Conversation` per peer
connection. A conversation:

- drains the peer's video track and keeps only the newest decoded frame (:mod:`fusion.chat_frames`), samples it
  at the model's rate (``sample_fps``), substituting the last good frame when none fresh arrived, and says so;
- talks with the sender on the ``chat`` data channel (reliable, ordered; JSON text messages):

  from the sender: ``{"type": "question", "text"}``;
  to the sender: ``{"type": "answer", "id", "delta"}`` pieces then ``{"type": "answer_done", "id", "frames"}``,
  ``{"type": "seen", "jpeg", "age_ms", "substituted", "reason"}`` (the frame the model got, small),
  ``{"type": "error", "message"}``, ``{"type": "status", ...}`` (frames, rates, substitution),
  ``{"type": "regions", ...}`` (where to spend bits, :mod:`transport.video_regions`) and
  ``{"type": "rate", "fps"}`` (the frame rate worth sending: :func:`send_fps`, less than a camera's 30 fps);
- asks the LLM (:mod:`fusion.llm_client`) with the question, the newest sampled frames and the conversation so
  far, and streams the answer back.

A page that never sends video gets an error message after ``first_frame_timeout_s``; an LLM that is down or slow
gets an error message to the page and the log. One conversation's failure never touches another's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
from aiohttp import web
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import InvalidAccessError, InvalidStateError

from fusion.chat_frames import FrameSampler, NewestFrame, Sample, release_frames_on_marker, repeat_nacks
from fusion.llm_client import LlmClient, LlmConfig, LlmError, jpeg_data_url
from transport import timecode
from transport.video_regions import rate_message, regions_message

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("chat_page.html")
CHANNEL_LABEL = "chat"
MAX_OFFER_BYTES = 64 * 1024
MAX_QUESTION_CHARS = 2000
SEEN_WIDTH_PX = 240


@dataclass
class ChatConfig:
    llm: LlmConfig
    sample_fps: float = 2.0
    """How many frames per second the model reads (about 1-5)."""
    max_age_ms: float = 300.0
    """A frame older than this at a sample is stale: the last good one is substituted."""
    frames_per_question: int = 2
    """How many of the newest sampled frames go with a question."""
    first_frame_timeout_s: float = 10.0
    regions: bool = True
    """Tell the sender where the question's regions are (context-aware bitrate)."""
    region_refresh_s: float = 2.0
    history_turns: int = 6
    send_fps: float | None = None
    """The frame rate asked of senders (``None``: :func:`send_fps` of ``sample_fps``)."""
    timecode: bool = False
    """Frames carry their capture time (:mod:`transport.timecode`; benchmarks): samples report capture age."""
    samples_log: Path | None = None
    """Append every sample here (JSON lines: time, ages, substituted) for benchmarks."""


@dataclass
class ChatCounters:
    offers: int = 0
    refused: dict = field(default_factory=dict)
    conversations: int = 0
    questions: int = 0
    answers: int = 0
    llm_errors: int = 0
    no_video: int = 0
    bad_messages: int = 0


class Conversation:
    """One peer connection: its frames, its data channel, its history with the model."""

    def __init__(self, server: ChatServer, pc: RTCPeerConnection, number: int) -> None:
        self.server = server
        self.pc = pc
        self.number = number
        self.frames = NewestFrame()
        self.sampler = FrameSampler(self.frames, max_age_ms=server.config.max_age_ms,
                                    capture_time=timecode.read if server.config.timecode else None)
        self.channel: RTCDataChannel | None = None
        self.history: list[dict] = []
        self.question = ""
        self.requested_fps: float | None = None
        self._tasks: set[asyncio.Task] = set()
        self._answering: asyncio.Task | None = None
        self._answers = 0
        self._has_video = False

    # ---- life cycle ---------------------------------------------------------------------------------------------

    def spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def on_track(self, track) -> None:
        if track.kind != "video":
            return
        self._has_video = True
        for receiver in self.pc.getReceivers():
            if receiver.track is track and release_frames_on_marker(receiver):
                self.spawn(repeat_nacks(receiver))
        self.frames.start(track)
        self.spawn(self._sample_loop())

    def on_channel(self, channel: RTCDataChannel) -> None:
        if channel.label != CHANNEL_LABEL:
            return
        self.channel = channel
        channel.on("message", self._on_message)
        self.spawn(self._watch_first_frame())
        self.spawn(self._status_loop())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.frames.stop()
        await self.pc.close()

    # ---- data channel -------------------------------------------------------------------------------------------

    def send(self, message: dict | str) -> None:
        channel = self.channel
        if channel is None or channel.readyState != "open":
            return
        channel.send(message if isinstance(message, str) else json.dumps(message))

    def error(self, message: str) -> None:
        log.warning("conversation %d: %s", self.number, message)
        self.send({"type": "error", "message": message})

    def _on_message(self, data: str | bytes) -> None:
        try:
            message = json.loads(data)
            if not isinstance(message, dict) or message.get("type") != "question":
                raise ValueError(f"expected {{'type': 'question', 'text': ...}}, got {str(data)[:80]!r}")
            text = message.get("text")
            if not isinstance(text, str) or not text.strip():
                raise ValueError("a question needs a non-empty 'text'")
            if len(text) > MAX_QUESTION_CHARS:
                raise ValueError(f"a question may hold at most {MAX_QUESTION_CHARS} characters, got {len(text)}")
        except ValueError as err:
            self.server.counters.bad_messages += 1
            self.error(f"bad message on the chat channel: {err}")
            return
        self.server.counters.questions += 1
        self.question = text.strip()
        if self._answering is not None and not self._answering.done():
            self.error("still answering the last question; ask again when its answer is done")
            return
        self._answering = self.spawn(self._answer(self.question))

    # ---- frames -------------------------------------------------------------------------------------------------

    async def _watch_first_frame(self) -> None:
        timeout = self.server.config.first_frame_timeout_s
        if not await self.frames.wait_first(timeout):
            self.server.counters.no_video += 1
            what = "no video track in the offer" if not self._has_video else (
                f"the video track ended: {self.frames.ended}" if self.frames.ended else "no frame decoded")
            self.error(f"no video received in {timeout:.0f} s ({what}); is the camera shared?")

    async def _sample_loop(self) -> None:
        period = 1.0 / self.server.config.sample_fps
        if not await self.frames.wait_first(self.server.config.first_frame_timeout_s * 6):
            return
        self._ask_rate()
        next_time = time.monotonic()
        last_regions = 0.0
        log_file = self.server.config.samples_log.open("a") if self.server.config.samples_log else None
        frame_wait_s = 1.5 / (self.server.config.send_fps or send_fps(self.server.config.sample_fps))
        while True:
            # The model's tick: take the next frame to arrive, waiting at most one and a half frame periods for
            # it (so a sample is as fresh as the network allows); none by then: lost or late, substituted.
            await self.frames.wait_newer(self.sampler.last_index, frame_wait_s)
            sample = self.sampler.sample()
            if log_file is not None and sample is not None:
                log_file.write(json.dumps({"conversation": self.number, "time_ns": sample.time_ns,
                                           "age_ms": round(sample.age_ms, 2), "substituted": sample.substituted,
                                           "capture_age_ms": None if sample.capture_age_ms is None
                                           else round(sample.capture_age_ms, 2),
                                           "frames_decoded": self.frames.decoded}) + "\n")
                log_file.flush()
            if (self.server.config.regions and self.question and sample is not None
                    and time.monotonic() - last_regions >= self.server.config.region_refresh_s):
                last_regions = time.monotonic()
                self._send_regions(sample)
            next_time += period
            await asyncio.sleep(max(0.0, next_time - time.monotonic()))

    def _ask_rate(self) -> None:
        fps = self.server.config.send_fps or send_fps(self.server.config.sample_fps)
        if self.requested_fps != fps:
            self.requested_fps = fps
            self.send(rate_message(fps))

    def _send_regions(self, sample: Sample) -> None:
        picker = self.server.region_picker
        if picker is None:
            return
        history = " ".join(turn["content"] for turn in self.history[-4:])
        regions, reason = picker.pick(sample.frame.pixels, self.question, history)
        self.send(regions_message(regions, reason))

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.send({"type": "status", **self.status()})

    def status(self) -> dict:
        return {"frames_decoded": self.frames.decoded, "arrival_fps": round(self.frames.arrival_fps(), 2),
                "requested_fps": self.requested_fps, "sample_fps": self.server.config.sample_fps,
                **self.sampler.stats.as_dict(), "answers": self._answers}

    # ---- the model ----------------------------------------------------------------------------------------------

    async def _answer(self, question: str) -> None:
        config = self.server.config
        if self.frames.newest is None and not await self.frames.wait_first(config.first_frame_timeout_s):
            self.error("no video frame to show the model yet; the question was not sent")
            return
        if self.sampler.stats.samples == 0:
            self.sampler.sample()
        if config.regions and self.sampler.samples:
            self._send_regions(self.sampler.samples[-1])
        samples = self.sampler.latest(config.frames_per_question)
        images = [jpeg_data_url(s.frame.pixels) for s in samples]
        newest = samples[-1]
        self.send({"type": "seen", "jpeg": _thumbnail(newest), "age_ms": round(newest.age_ms, 1),
                   "substituted": newest.substituted, "reason": newest.reason})
        self._answers += 1
        answer_id = self._answers
        pieces: list[str] = []
        try:
            async for piece in self.server.llm.stream(question, images, self.history[-2 * config.history_turns:]):
                pieces.append(piece)
                self.send({"type": "answer", "id": answer_id, "delta": piece})
        except LlmError as err:
            self.server.counters.llm_errors += 1
            self.error(f"the model did not answer: {err}")
            return
        self.server.counters.answers += 1
        answer = "".join(pieces)
        self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        self.send({"type": "answer_done", "id": answer_id, "frames": len(images),
                   "substituted": sum(s.substituted for s in samples)})


def send_fps(sample_fps: float) -> float:
    """The frame rate worth asking a sender for: three frames per sample the model reads (so a lost frame still
    leaves a fresh one, and a sample waits at most a third of its period for the next), at least 5 fps (a frame at
    most 200 ms old when it is sampled), at most 30."""
    return round(min(30.0, max(5.0, 3 * sample_fps)), 2)


def _thumbnail(sample: Sample) -> str:
    pixels = sample.frame.pixels
    height, width = pixels.shape[:2]
    scale = SEEN_WIDTH_PX / width
    small = cv2.resize(pixels, (SEEN_WIDTH_PX, max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    return jpeg_data_url(small, quality=70)


class ChatServer:
    """The page, the signalling endpoint and every conversation."""

    def __init__(self, config: ChatConfig, *, region_picker=None, llm: LlmClient | None = None) -> None:
        self.config = config
        self.llm = llm or LlmClient(config.llm)
        self.region_picker = region_picker
        self.counters = ChatCounters()
        self.conversations: list[Conversation] = []
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        app = web.Application(client_max_size=MAX_OFFER_BYTES)
        app.router.add_get("/", self._page)
        app.router.add_post("/offer", self._offer)
        app.router.add_get("/status", self._status)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        return self._runner.addresses[0][1]

    async def stop(self) -> None:
        await asyncio.gather(*(c.close() for c in self.conversations), return_exceptions=True)
        self.conversations.clear()
        await self.llm.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def status(self) -> dict:
        counters = self.counters
        return {"offers": counters.offers, "refused": dict(counters.refused), "conversations": counters.conversations,
                "questions": counters.questions, "answers": counters.answers, "llm_errors": counters.llm_errors,
                "no_video": counters.no_video, "bad_messages": counters.bad_messages,
                "open": [c.status() for c in self.conversations]}

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE.read_text(), content_type="text/html")

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    def _refuse(self, reason: str, message: str) -> web.Response:
        self.counters.refused[reason] = self.counters.refused.get(reason, 0) + 1
        log.warning("refused an offer (%s): %s", reason, message)
        return web.json_response({"error": message}, status=400)

    async def _offer(self, request: web.Request) -> web.Response:
        self.counters.offers += 1
        try:
            body = await request.json()
        except ValueError as err:
            return self._refuse("malformed", f"the offer is not JSON: {err}")
        if not isinstance(body, dict) or body.get("type") != "offer" or not isinstance(body.get("sdp"), str) \
                or not body["sdp"].strip():
            return self._refuse("malformed", "the offer must be a JSON object {\"sdp\": non-empty string, "
                                             "\"type\": \"offer\"}")
        if "m=video" not in body["sdp"]:
            return self._refuse("no_video", "the offer has no video (no m=video section): share a camera")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.counters.conversations += 1
        conversation = Conversation(self, pc, self.counters.conversations)
        pc.on("track", conversation.on_track)
        pc.on("datachannel", conversation.on_channel)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed") and conversation in self.conversations:
                self.conversations.remove(conversation)
                await conversation.close()

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        # aiortc's SDP parser reports some malformed lines with assert statements.
        except (ValueError, AttributeError, KeyError, IndexError, AssertionError, InvalidAccessError,
                InvalidStateError) as err:
            await pc.close()
            return self._refuse("bad_sdp", f"cannot answer this offer: {err or type(err).__name__}")
        self.conversations.append(conversation)
        return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type})
