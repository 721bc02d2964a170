"""A Python peer for the video chat: a robot's camera, a video file or a test pattern instead of a browser.

It does what the page does: offers a send-only video track and the ``chat`` data channel to the chat server
(``POST {server}/offer``), follows the server's ``rate`` (frames per second worth sending) and ``regions``
(where the question looks: everything else is blurred before encoding, :func:`transport.video_regions.prefilter`)
messages, asks questions and collects the streamed answers.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import logging
import time
from dataclasses import dataclass, field

import aiohttp
import av
import cv2
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from transport import timecode
from transport.video_regions import RateHint, RegionsHint, parse_control, prefilter

log = logging.getLogger(__name__)

VIDEO_CLOCK_HZ = 90_000
CONNECT_TIMEOUT_S = 15.0


class SenderError(RuntimeError):
    """The source cannot be opened, or the server refused or did not answer."""


class FrameSource:
    """Frames from a camera index, a video file (looped) or ``pattern`` (a moving test pattern with text)."""

    def __init__(self, spec: str, width: int = 640, height: int = 480) -> None:
        self.spec = spec
        self.width, self.height = width, height
        self.capture = None
        self.count = 0
        if spec != "pattern":
            target = int(spec) if spec.isdigit() else spec
            self.capture = cv2.VideoCapture(target)
            if not self.capture.isOpened():
                raise SenderError(f"cannot open the video source {spec!r} (a camera index, a video file or "
                                  f"'pattern')")

    def read(self) -> np.ndarray:
        """The next frame, RGB, ``height × width × 3`` uint8."""
        self.count += 1
        if self.capture is None:
            return self._pattern()
        ok, frame = self.capture.read()
        if not ok:  # the end of a file: loop
            self.capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = self.capture.read()
            if not ok:
                raise SenderError(f"the video source {self.spec!r} gives no frames")
        frame = cv2.resize(frame, (self.width, self.height), interpolation=cv2.INTER_AREA)
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def _pattern(self) -> np.ndarray:
        y, x = np.mgrid[0:self.height, 0:self.width]
        t = self.count
        image = np.stack([(x + 3 * t) % 256, (y + 2 * t) % 256, ((x + y) // 2 + t) % 256], axis=-1).astype(np.uint8)
        cv2.putText(image, f"frame {t}", (40, 80), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (255, 255, 255), 3)
        return image

    def close(self) -> None:
        if self.capture is not None:
            self.capture.release()


class SenderTrack(MediaStreamTrack):
    """A video track paced by the rate the server asks for, prefiltered by the regions it names."""

    kind = "video"

    def __init__(self, source: FrameSource, fps: float = 10.0, stamp_time: bool = False) -> None:
        super().__init__()
        self.source = source
        self.fps = fps
        self.stamp_time = stamp_time
        self.regions: list = []
        self.sent = 0
        self._start: float | None = None
        self._next = 0.0

    async def recv(self) -> av.VideoFrame:
        now = time.monotonic()
        if self._start is None:
            self._start = self._next = now
        else:
            self._next = max(self._next + 1.0 / self.fps, now - 1.0 / self.fps)
            await asyncio.sleep(max(0.0, self._next - now))
        image = self.source.read()
        if self.regions:
            image = prefilter(image, self.regions)
        if self.stamp_time:
            image = timecode.stamp(np.ascontiguousarray(image), time.time_ns())
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = int((time.monotonic() - self._start) * VIDEO_CLOCK_HZ)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK_HZ)
        self.sent += 1
        return frame


@dataclass
class ChatSender:
    """One conversation with a chat server."""

    server: str
    source: FrameSource
    fps: float = 10.0
    timecode: bool = False
    answers: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    status: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.track = SenderTrack(self.source, self.fps, self.timecode)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = None
        self._open = asyncio.Event()
        self._done: asyncio.Queue[str] = asyncio.Queue()
        self._pieces: dict[int, list[str]] = {}

    async def connect(self) -> None:
        self.pc.addTransceiver(self.track, direction="sendonly")
        self.channel = self.pc.createDataChannel("chat")
        self.channel.on("open", self._open.set)
        self.channel.on("message", self._on_message)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        body = {"sdp": self.pc.localDescription.sdp, "type": self.pc.localDescription.type}
        try:
            async with aiohttp.ClientSession() as session, session.post(
                    self.server.rstrip("/") + "/offer", json=body,
                    timeout=aiohttp.ClientTimeout(total=CONNECT_TIMEOUT_S)) as response:
                reply = await response.json(content_type=None)
                if response.status != 200:
                    raise SenderError(f"{self.server} refused the offer: {reply.get('error', reply)}")
        except (aiohttp.ClientError, TimeoutError) as err:
            raise SenderError(f"cannot reach the chat server {self.server}: {err or type(err).__name__}") from err
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=reply["sdp"], type=reply["type"]))
        try:
            await asyncio.wait_for(self._open.wait(), CONNECT_TIMEOUT_S)
        except TimeoutError as err:
            raise SenderError(f"the data channel to {self.server} did not open in {CONNECT_TIMEOUT_S:.0f} s") from err

    def _on_message(self, data: str | bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            self.errors.append(f"the server sent bad JSON: {str(data)[:80]!r}")
            return
        kind = message.get("type") if isinstance(message, dict) else None
        if kind in ("regions", "rate"):
            try:
                hint = parse_control(data)
            except ValueError as err:
                self.errors.append(f"bad {kind} message from the server: {err}")
                return
            if isinstance(hint, RateHint):
                self.track.fps = hint.fps
            elif isinstance(hint, RegionsHint):
                self.track.regions = list(hint.regions)
        elif kind == "answer":
            self._pieces.setdefault(message["id"], []).append(message["delta"])
        elif kind == "answer_done":
            answer = "".join(self._pieces.pop(message["id"], []))
            self.answers.append(answer)
            self._done.put_nowait(answer)
        elif kind == "error":
            self.errors.append(message.get("message", ""))
            self._done.put_nowait("")
        elif kind == "status":
            self.status = message

    async def ask(self, question: str, timeout_s: float = 60.0) -> str:
        """Send a question; the answer (an empty string when the server reports an error instead)."""
        self.channel.send(json.dumps({"type": "question", "text": question}))
        try:
            return await asyncio.wait_for(self._done.get(), timeout_s)
        except TimeoutError as err:
            raise SenderError(f"no answer to {question!r} in {timeout_s:.0f} s") from err

    async def close(self) -> None:
        await self.pc.close()
        self.source.close()
