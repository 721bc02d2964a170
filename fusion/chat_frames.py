"""The newest decoded video frame, and the frames a model samples from it at its own rate.

aiortc decodes a remote video track into a queue that nothing bounds: a consumer that reads slower
than the sender sends falls further and further behind, and a model would answer about the past.
:class:`NewestFrame` drains that queue as fast as frames are decoded and keeps only the newest one
(converted to pixels only when a sample asks for it). :class:`FrameSampler` hands the model a frame
at the model's own rate and says when it could not hand a fresh one: when no frame arrived since the
last sample (lost or late on the network), or the newest is older than ``max_age_ms``, the last good
frame (the newest decoded) stands in and the sample is marked substituted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from aiortc.jitterbuffer import JitterBuffer, JitterFrame

log = logging.getLogger(__name__)

RATE_WINDOW_S = 2.0
"""Seconds over which the arrival rate of frames is measured."""


class MarkerJitterBuffer(JitterBuffer):
    """aiortc's video jitter buffer, handing a frame to the decoder as soon as its last packet is in.

    aiortc 1.16 releases a frame only when the first packet of the *next* frame arrives, which holds every frame
    back by one frame period (measured here: frames 240 ms old at the model at 6 fps, 0 % loss). RTP marks a video
    frame's last packet (the marker bit, RFC 7741 for VP8); when the packets from the buffer's start through a
    marked one are all in and share a timestamp, they are the whole frame. Otherwise aiortc's own rule applies.
    """

    last_packet: tuple[float, int, bool] | None = None
    """(``time.monotonic()``, sequence number, marker bit) of the newest packet added."""

    def add(self, packet) -> tuple[bool, JitterFrame | None]:
        self.last_packet = (time.monotonic(), packet.sequence_number, bool(packet.marker))
        return super().add(packet)

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        packets = []
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self._capacity]
            if packet is None or (packets and packet.timestamp != packets[0].timestamp):
                break
            packets.append(packet)
            if packet.marker:
                self.remove(count + 1)
                return JitterFrame(data=b"".join(p._data for p in packets), timestamp=packets[0].timestamp)
        return super()._remove_frame(sequence_number)


NACK_REPEAT_S = 0.02
"""How often :func:`repeat_nacks` asks again for the packets still missing."""
TAIL_SILENCE_S = 0.03
"""A frame whose last packet (marker) is this overdue after its newest one: ask for the next two packets."""


async def repeat_nacks(receiver) -> None:
    """Ask the sender again, every :data:`NACK_REPEAT_S`, for the packets still missing, and for a frame's last
    packets when they are overdue; runs until cancelled or the connection closes.

    aiortc 1.16 sends a NACK only when a *new* gap appears. When that NACK or its retransmission is lost, the hole
    stays until another packet is lost, and a frame whose last packet was lost is noticed only when the next frame
    starts; frames are decoded in order, so every later frame waits behind the hole. Measured under 20 % loss both
    ways at 6 fps: retransmissions came 167 ms (a frame period) or several periods late, and the frames the model
    read were 254 ms old (median) and 0.7-1.0 s (p99); repeating the NACKs: 86 ms and 253 ms. A sender
    retransmits only packets it holds, so asking for one it never sent costs one small RTCP packet. The NACK
    names the media stream's SSRC, not its retransmission (RTX) stream's. Reaches into aiortc's private receiver
    state, like :func:`release_frames_on_marker`.
    """
    generator = getattr(receiver, "_RTCRtpReceiver__nack_generator", None)
    buffer = getattr(receiver, "_RTCRtpReceiver__jitter_buffer", None)
    active = getattr(receiver, "_RTCRtpReceiver__active_ssrc", None)
    rtx = getattr(receiver, "_RTCRtpReceiver__rtx_ssrc", None)
    if generator is None or not isinstance(buffer, MarkerJitterBuffer) or active is None or rtx is None:
        log.warning("aiortc's receiver state is not where expected: lost packets are asked for once only")
        return
    while True:
        await asyncio.sleep(NACK_REPEAT_S)
        media = [ssrc for ssrc in active if ssrc not in rtx]
        if not media or buffer.last_packet is None or generator.max_seq is None:
            continue
        lost = set(generator.missing)
        arrived, sequence, marker = buffer.last_packet
        if not marker and sequence == generator.max_seq and time.monotonic() - arrived > TAIL_SILENCE_S:
            lost |= {(sequence + 1) & 0xFFFF, (sequence + 2) & 0xFFFF}
        if lost:
            try:
                await receiver._send_rtcp_nack(media[-1], sorted(lost))
            except ConnectionError:
                return


def release_frames_on_marker(receiver) -> bool:
    """Give an aiortc video ``RTCRtpReceiver`` a :class:`MarkerJitterBuffer` (before media flows). It reaches into
    aiortc's private state (pinned to 1.16 in pyproject.toml); ``False`` when that state is not there."""
    name = "_RTCRtpReceiver__jitter_buffer"
    if not isinstance(getattr(receiver, name, None), JitterBuffer):
        log.warning("aiortc's receiver has no jitter buffer where expected: frames are released a frame late")
        return False
    setattr(receiver, name, MarkerJitterBuffer(capacity=512, is_video=True))
    return True


@dataclass
class Frame:
    """One decoded frame: its pixels (RGB, H×W×3 uint8, converted on first use) and when it was decoded."""

    index: int
    """Count of frames decoded before it on this track."""
    received_ns: int
    """``time.time_ns()`` when the decoder handed it over."""
    source: object = None
    """The decoder's frame (``av.VideoFrame``) until converted."""
    _pixels: np.ndarray | None = None

    @property
    def pixels(self) -> np.ndarray:
        if self._pixels is None:
            self._pixels = self.source.to_ndarray(format="rgb24")  # type: ignore[union-attr]
            self.source = None
        return self._pixels


@dataclass
class Sample:
    """A frame handed to the model."""

    frame: Frame
    time_ns: int
    age_ms: float
    """How long before the sample the frame was decoded."""
    substituted: bool
    reason: str = ""
    """Why the frame was substituted (empty when it is fresh)."""
    capture_age_ms: float | None = None
    """How long before the sample the frame was captured, where the frame says when (a timecode)."""


class NewestFrame:
    """Drains a video track (anything with ``async recv()``) and keeps only its newest frame."""

    def __init__(self) -> None:
        self.newest: Frame | None = None
        self.decoded = 0
        self.ended: str | None = None
        """Why the track ended (``None`` while it runs)."""
        self._arrivals: deque[int] = deque()
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()

    def start(self, track) -> None:
        self._task = asyncio.ensure_future(self._drain(track))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _drain(self, track) -> None:
        try:
            while True:
                decoded = await track.recv()
                now = time.time_ns()
                self.newest = Frame(self.decoded, now, decoded)  # the older one is dropped unconverted
                self.decoded += 1
                self._arrivals.append(now)
                while self._arrivals and now - self._arrivals[0] > RATE_WINDOW_S * 1e9:
                    self._arrivals.popleft()
                self._changed.set()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - aiortc ends a track with MediaStreamError
            self.ended = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            self._changed.set()

    async def wait_first(self, timeout_s: float) -> bool:
        """Wait until a frame has been decoded (``True``) or ``timeout_s`` passed or the track ended."""
        return await self.wait_newer(-1, timeout_s)

    async def wait_newer(self, index: int, timeout_s: float) -> bool:
        """Wait until a frame after frame ``index`` has been decoded (``True``), or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        while (self.newest is None or self.newest.index <= index) and self.ended is None:
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return False
        return self.newest is not None and self.newest.index > index

    def arrival_fps(self) -> float:
        """Frames decoded per second over the last :data:`RATE_WINDOW_S` seconds."""
        if len(self._arrivals) < 2:
            return 0.0
        span = (self._arrivals[-1] - self._arrivals[0]) / 1e9
        return (len(self._arrivals) - 1) / span if span > 0 else 0.0


@dataclass
class SamplerStats:
    samples: int = 0
    substituted: int = 0
    ages_ms: deque = field(default_factory=lambda: deque(maxlen=10_000))
    capture_ages_ms: deque = field(default_factory=lambda: deque(maxlen=10_000))

    def as_dict(self) -> dict:
        result = {"samples": self.samples, "substituted": self.substituted,
                  "substituted_share": round(self.substituted / self.samples, 4) if self.samples else None,
                  "age_ms": percentiles(self.ages_ms)}
        if self.capture_ages_ms:
            result["capture_age_ms"] = percentiles(self.capture_ages_ms)
        return result


def percentiles(values) -> dict:
    """p50 and p99 (nearest rank) of ``values``; ``None`` for an empty one."""
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "p99": None}
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)  # noqa: E731
    return {"p50": pick(0.5), "p99": pick(0.99)}


class FrameSampler:
    """Samples a :class:`NewestFrame` for the model; keeps the last ``keep`` samples.

    A sample is always the newest decoded frame, the last good one; it is marked substituted when it is not new
    since the last sample (the frames after it were lost or are late) or older than ``max_age_ms``.
    """

    def __init__(self, source: NewestFrame, *, max_age_ms: float = 300.0, keep: int = 8,
                 capture_time=None) -> None:
        """``capture_time(pixels) -> ns | None`` reads a frame's capture time where frames carry one."""
        self.source = source
        self.capture_time = capture_time
        self.max_age_ms = max_age_ms
        self.samples: deque[Sample] = deque(maxlen=keep)
        self.stats = SamplerStats()
        self._last_index = -1

    def sample(self, now_ns: int | None = None) -> Sample | None:
        """The frame the model reads now (``None`` before any frame arrived)."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        newest = self.source.newest
        if newest is None:
            return None
        age_ms = (now_ns - newest.received_ns) / 1e6
        if newest.index == self._last_index:
            reason = "no new frame since the last sample (lost or late)"
        elif age_ms > self.max_age_ms:
            reason = f"the newest frame is {age_ms:.0f} ms old (over {self.max_age_ms:.0f} ms)"
        else:
            reason = ""
        frame = newest
        self._last_index = newest.index
        result = Sample(frame, now_ns, age_ms, bool(reason), reason)
        if self.capture_time is not None:
            captured = self.capture_time(frame.pixels)
            if captured is not None:
                result.capture_age_ms = (now_ns - captured) / 1e6
                self.stats.capture_ages_ms.append(result.capture_age_ms)
        self.samples.append(result)
        self.stats.samples += 1
        self.stats.substituted += bool(reason)
        self.stats.ages_ms.append(age_ms)
        return result

    @property
    def last_index(self) -> int:
        """Index of the frame of the last sample (-1 before any)."""
        return self._last_index

    def latest(self, count: int) -> list[Sample]:
        """The newest ``count`` samples, oldest first, without repeating a frame."""
        seen, out = set(), []
        for sample in reversed(self.samples):
            if sample.frame.index in seen:
                continue
            seen.add(sample.frame.index)
            out.append(sample)
            if len(out) == count:
                break
        return out[::-1]
