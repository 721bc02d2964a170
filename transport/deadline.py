"""The receive side's per-agent deadline buffer: chunks in, frames (complete or partial) out.

A frame may arrive as several chunks (``FeatureFrame.chunk_count > 1``, see
:func:`transport.framing.split_frame`), over a link that loses some of them. Per agent,
:class:`AgentBuffer` checks every chunk, reassembles frames by sequence, and says when a
frame is *settled*: complete, or incomplete but no longer worth waiting for (its first chunk
came ``chunk_grace_ms`` ago - a frame's chunks leave the sender back to back - or a chunk of
a later frame has arrived). It also measures the link as the receiver sees it (loss of
chunks, delivered bitrate, one-way delay above the smallest seen), which the fusion node
sends back in ``Control.link`` for the sender's rate control.

Refused, counted and never fused (:class:`ChunkRefused` names what is wrong): a chunk index
out of range, a duplicate chunk, a tile index out of range or twice, a tile whose CRC-32
does not match its payload, a chunk that contradicts earlier chunks of its frame (capture
time, chunk count), and sequence numbers from the past (older than the frames kept) or the
far future. Nothing else of the agent's stream is lost.

This module knows nothing of codecs or tensors: what a tile holds is the fusion node's business.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from protos import Box3D, FeatureFrame, LinkReport, Tile

MAX_CHUNKS_PER_FRAME = 1024
"""A frame split into more chunks than this is refused (no real frame comes close)."""


class ChunkRefused(ValueError):
    """A chunk the receiver will not use; the message says why."""


@dataclass(slots=True)
class Assembly:
    """One frame of one agent as far as its chunks have arrived."""

    header: FeatureFrame
    """The first chunk received, without tiles or object list: pose, grid, codec, times."""
    chunk_count: int
    chunks: set[int] = field(default_factory=set)
    tiles: dict[int, Tile] = field(default_factory=dict)
    detections: list[Box3D] = field(default_factory=list)
    scan_blocks: dict[int, list[bytes]] = field(default_factory=dict)
    """Registration-scan blocks by the chunk that carried them."""
    first_receive_ns: int = 0
    last_receive_ns: int = 0
    last_send_ns: int = 0
    wire_bytes: int = 0
    revision: int = 0
    """Bumped by every chunk that adds to the frame (a decoded copy older than this is stale)."""

    @property
    def sequence(self) -> int:
        return self.header.sequence

    @property
    def capture_time_ns(self) -> int:
        return self.header.capture_time_ns

    @property
    def complete(self) -> bool:
        return len(self.chunks) == self.chunk_count

    def message(self) -> FeatureFrame:
        """The frame as far as it arrived, as one unchunked message (tiles in index order)."""
        out = FeatureFrame()
        out.CopyFrom(self.header)
        out.tiles.extend(self.tiles[i] for i in sorted(self.tiles))
        out.detections.extend(self.detections)
        out.scan_blocks.extend(b for i in sorted(self.scan_blocks) for b in self.scan_blocks[i])
        out.chunk_index, out.chunk_count = 0, 0
        return out


@dataclass(slots=True)
class _Arrival:
    receive_ns: int
    sequence: int
    chunk_count: int
    wire_bytes: int
    delay_ns: int


@dataclass(slots=True)
class AgentBuffer:
    """Chunks of one agent's frames, reassembled; the newest ``keep`` frames are kept."""

    agent_id: int
    keep: int = 8
    """Frames kept (by sequence); an older chunk is refused as from the past."""
    max_future_frames: int = 600
    """A sequence this far beyond the newest one is refused (a minute at 10 Hz)."""
    chunk_grace_ms: float = 20.0
    window_ms: float = 1000.0
    """Length of the link measurement window."""
    session_id: int | None = None
    frames: OrderedDict[int, Assembly] = field(default_factory=OrderedDict)  # sequence -> frame, oldest first
    newest_sequence: int = -1
    chunks_received: int = 0
    chunks_refused: int = 0
    _arrivals: deque[_Arrival] = field(default_factory=deque)
    _min_delay_ns: int | None = None
    _first_chunk_delays: deque[int] = field(default_factory=lambda: deque(maxlen=100))
    _spreads: deque[int] = field(default_factory=lambda: deque(maxlen=100))
    """First to last chunk arrival of recent complete multi-chunk frames, ns."""

    def add(self, chunk: FeatureFrame, receive_ns: int, wire_bytes: int) -> Assembly:
        """Check ``chunk`` and add it to its frame; returns that frame.

        Raises:
            ChunkRefused: what is wrong with the chunk (nothing of it is kept).
        """
        try:
            assembly = self._add(chunk, receive_ns, wire_bytes)
        except ChunkRefused:
            self.chunks_refused += 1
            raise
        self.chunks_received += 1
        delay = receive_ns - chunk.send_time_ns if chunk.send_time_ns > 0 else 0
        if chunk.send_time_ns > 0:
            self._min_delay_ns = delay if self._min_delay_ns is None else min(self._min_delay_ns, delay)
        self._arrivals.append(_Arrival(receive_ns, chunk.sequence, assembly.chunk_count, wire_bytes, delay))
        self._forget(receive_ns)
        return assembly

    def _add(self, chunk: FeatureFrame, receive_ns: int, wire_bytes: int) -> Assembly:
        if chunk.agent_id != self.agent_id:
            raise ChunkRefused(f"chunk says agent {chunk.agent_id} on agent {self.agent_id}'s link")
        count = max(1, chunk.chunk_count)
        if count > MAX_CHUNKS_PER_FRAME:
            raise ChunkRefused(f"chunk count {chunk.chunk_count} exceeds {MAX_CHUNKS_PER_FRAME}")
        if chunk.chunk_index >= count:
            raise ChunkRefused(f"chunk index {chunk.chunk_index} out of range for {count} chunk(s)")
        seen: set[int] = set()
        for tile in chunk.tiles:
            if chunk.tile_count and tile.index >= chunk.tile_count:
                raise ChunkRefused(f"tile index {tile.index} out of range for {chunk.tile_count} tiles")
            if tile.index in seen:
                raise ChunkRefused(f"duplicate tile index {tile.index} in one chunk")
            seen.add(tile.index)
            if zlib.crc32(tile.payload) != tile.crc32:
                raise ChunkRefused(f"bad checksum on tile {tile.index}")
        if self.session_id != chunk.session_id:  # a new session (the agent restarted): sequences restart
            self.session_id = chunk.session_id
            self.frames.clear()
            self.newest_sequence = -1
        sequence = chunk.sequence
        if self.newest_sequence >= 0:
            if sequence > self.newest_sequence + self.max_future_frames:
                raise ChunkRefused(f"sequence {sequence} is from the far future (newest {self.newest_sequence})")
            if sequence not in self.frames and sequence <= self.newest_sequence - self.keep:
                raise ChunkRefused(f"sequence {sequence} is from the past (newest {self.newest_sequence})")
        assembly = self.frames.get(sequence)
        if assembly is None:
            header = FeatureFrame()
            header.CopyFrom(chunk)
            del header.tiles[:]
            del header.detections[:]
            del header.scan_blocks[:]
            header.auth_token = ""
            assembly = Assembly(header, count, first_receive_ns=receive_ns)
            self._first_chunk_delays.append(receive_ns - chunk.capture_time_ns)
        else:
            if count != assembly.chunk_count:
                raise ChunkRefused(f"chunk count {count} contradicts {assembly.chunk_count} of frame {sequence}")
            if chunk.capture_time_ns != assembly.capture_time_ns:
                raise ChunkRefused(f"capture time {chunk.capture_time_ns} contradicts frame {sequence}'s")
            if chunk.rate_level != assembly.header.rate_level or chunk.codec_id != assembly.header.codec_id:
                raise ChunkRefused(f"codec or rate level contradicts frame {sequence}'s")
            if chunk.chunk_index in assembly.chunks:
                raise ChunkRefused(f"duplicate chunk {chunk.chunk_index} of frame {sequence}")
            again = seen & assembly.tiles.keys()
            if again:
                raise ChunkRefused(f"duplicate tile index {min(again)} in frame {sequence}")
        if sequence not in self.frames:
            self.frames[sequence] = assembly
            self.newest_sequence = max(self.newest_sequence, sequence)
            while len(self.frames) > self.keep:  # drop the oldest frames (by sequence)
                del self.frames[min(self.frames)]
        assembly.chunks.add(chunk.chunk_index)
        assembly.tiles.update((t.index, t) for t in chunk.tiles)
        if chunk.detections:
            assembly.detections = list(chunk.detections)
        if chunk.scan_blocks:
            assembly.scan_blocks[chunk.chunk_index] = list(chunk.scan_blocks)
        if chunk.HasField("calibration"):
            assembly.header.calibration.CopyFrom(chunk.calibration)
        assembly.last_receive_ns = receive_ns
        assembly.last_send_ns = max(assembly.last_send_ns, chunk.send_time_ns)
        assembly.wire_bytes += wire_bytes
        assembly.revision += 1
        if assembly.complete and assembly.chunk_count > 1:
            self._spreads.append(receive_ns - assembly.first_receive_ns)
        return assembly

    def settled(self, assembly: Assembly, now_ns: int) -> bool:
        """Whether waiting longer for ``assembly`` is pointless: complete, past :meth:`settle_time_ns`,
        or a later frame has begun to arrive."""
        return assembly.complete or now_ns >= self.settle_time_ns(assembly) or self.newest_sequence > assembly.sequence

    def give_up_time_ns(self, capture_time_ns: int, margin_ms: float, quantile: float = 0.95) -> int | None:
        """When a frame captured at ``capture_time_ns`` of which nothing has arrived is no longer
        worth waiting for: the ``quantile`` of this link's recent first-chunk delays (capture to
        arrival, sender and receiver clocks as they are) plus ``margin_ms``. ``None`` until 20
        frames have been seen."""
        if len(self._first_chunk_delays) < 20:
            return None
        delays = sorted(self._first_chunk_delays)
        return capture_time_ns + delays[min(len(delays) - 1, int(quantile * len(delays)))] + int(margin_ms * 1e6)

    def settle_time_ns(self, assembly: Assembly) -> int:
        """When an incomplete ``assembly`` stops being waited for: once the link's complete frames
        would all have been complete (their first-to-last chunk spread, p95, + 3 ms, after this
        frame's first chunk), but never before 2 ms after its last chunk nor later than
        ``chunk_grace_ms`` after it (the rule alone until 20 complete frames have been seen)."""
        grace = assembly.last_receive_ns + int(self.chunk_grace_ms * 1e6)
        if len(self._spreads) < 20:
            return grace
        spreads = sorted(self._spreads)
        expected = assembly.first_receive_ns + spreads[int(0.95 * (len(spreads) - 1))] + 3_000_000
        return min(grace, max(assembly.last_receive_ns + 2_000_000, expected))

    def _forget(self, now_ns: int) -> None:
        horizon = now_ns - int(self.window_ms * 1e6)
        while self._arrivals and self._arrivals[0].receive_ns < horizon:
            self._arrivals.popleft()

    def report(self, now_ns: int) -> LinkReport:
        """The link over the last ``window_ms`` as this receiver saw it.

        Loss counts the chunks of every frame in the window's sequence range that did not
        arrive (frames with no chunk at all count with the mean chunk count); the newest
        frame is left out while it may still be arriving.
        """
        self._forget(now_ns)
        window = list(self._arrivals)
        report = LinkReport(window_ms=self.window_ms, last_sequence=max(self.newest_sequence, 0))
        if not window:
            return report
        report.delivered_bitrate_bps = int(sum(a.wire_bytes for a in window) * 8 * 1e3 / self.window_ms)
        grace_ns = int(self.chunk_grace_ms * 1e6)
        counted = [a for a in window if not (a.sequence == self.newest_sequence and now_ns - a.receive_ns < grace_ns)]
        if counted:
            per_frame = {a.sequence: a.chunk_count for a in counted}
            received = len(counted)
            lo, hi = min(per_frame), max(per_frame)
            mean = sum(per_frame.values()) / len(per_frame)
            expected = sum(per_frame.values()) + (hi - lo + 1 - len(per_frame)) * mean
            report.loss_fraction = max(0.0, 1.0 - received / expected) if expected else 0.0
        report.queueing_delay_ms = self.queueing_delay_ms(now_ns)
        return report

    def queueing_delay_ms(self, now_ns: int, recent_ms: float = 500.0) -> float:
        """One-way delay above the smallest ever seen (a queue building up on the path), ms: the 90th
        percentile over the chunks of the last ``recent_ms`` (a queue shows in its tail first)."""
        self._forget(now_ns)
        if self._min_delay_ns is None:
            return 0.0
        horizon = now_ns - int(recent_ms * 1e6)
        delays = sorted(a.delay_ns for a in self._arrivals if a.receive_ns >= horizon)
        if not delays:
            return 0.0
        return (delays[int(0.9 * (len(delays) - 1))] - self._min_delay_ns) / 1e6
