"""The fusion node: agents stream ``FeatureFrame``s in, fused detections stream out.

One ``grpc.aio`` bidi stream per agent feeds a per-agent buffer that keeps only the
last few frames (latest wins; never an unbounded queue). Fusion ticks follow the
sensor clock: frames are placed in slots of ``1 / rate_hz`` by their capture time,
and slot ``s`` is fused as soon as every connected agent has delivered it, or at
its capture time plus ``deadline_ms`` at the latest. A slow or silent agent never
holds a tick: what it has not delivered by then is replaced by its last frame
(when younger than ``max_age_ms``) or left out, and the fused frame says which.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fusion.receive import Contribution, FrameRefused, decode_frame, expected_grid
from models.codec import FeatureCodec
from models.codec_train import load_codec
from models.detector import BevDetector, Precision, load_checkpoint
from models.geometry import invert_se3
from protos import (AgentContribution, ContributionStatus, Control, FeatureFrame, FusedFrame, FusionServicer, LinkStats,
                    StageTiming, SubscribeRequest)
from transport import (AGENT_KEY, TOKEN_KEY, FusionServer, MalformedFrame, TlsFiles, boxes_to_proto, pose_to_proto,
                       start_fusion_server)

log = logging.getLogger(__name__)

FRAMES_KEPT = 4
"""Frames kept per agent (the newest few slots): enough to fuse a slot while the next arrives."""


class TlsConfig(BaseModel):
    """PEM paths; all unset means plain TCP (fine on a private network or loopback)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    """When set, agents must present a certificate signed by this CA (mutual TLS)."""

    def files(self) -> TlsFiles | None:
        if self.cert is None and self.key is None:
            return None
        return TlsFiles(ca=self.client_ca, cert=self.cert, key=self.key)


class FusionConfig(BaseModel):
    """What the fusion node needs (a launch file's ``fusion:`` section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: str = "127.0.0.1:50051"
    """``host:port`` to serve on (port 0: any free port)."""
    detector: Path = Path("models/checkpoints/mobiledet_tiny.pt")
    codec: Path | None = Path("models/checkpoints/codec_mobiledet_tiny.pt")
    """The codec agents code with (``None``: only raw features are accepted)."""
    tokens: dict[int, str] = {}
    """Agent id -> token. Frames from agents not listed, or with another token, are refused."""
    allow_any_agent: bool = False
    """Accept agents without checking tokens (tests and closed labs only)."""
    tls: TlsConfig = TlsConfig()
    rate_hz: float = Field(10.0, gt=0.0)
    """Sensor rate: one fusion slot per period."""
    deadline_ms: float = Field(100.0, gt=0.0)
    """A slot is fused at its capture time plus this at the latest, whatever has arrived."""
    max_age_ms: float = Field(300.0, ge=0.0)
    """An agent's last frame stands in for a missing one while younger than this."""
    ego_agent_id: int | None = None
    """The agent whose frame fused boxes are given in (default: the smallest non-negative id present)."""
    max_payload_bytes: int = Field(1_000_000, gt=0)
    """Feature payload per frame above which a frame is refused (below gRPC's message limit)."""
    score_threshold: float = Field(0.1, ge=0.0, le=1.0)
    threads: int = Field(1, ge=1)
    """torch CPU threads for decoding and detection."""
    precision: Precision = "auto"
    """Arithmetic of the backbone and head: ``auto`` is bfloat16 where the hardware has it natively
    (the same AP to a tenth of a point on the held-out world, about a third less head time), else float32."""
    subscriber_queue: int = Field(16, ge=1)
    """Fused frames buffered per subscriber; a slower subscriber loses the oldest."""


@dataclass(slots=True)
class AgentState:
    """Per-agent buffer and counters."""

    agent_id: int
    frames: OrderedDict[int, Contribution] = field(default_factory=OrderedDict)  # slot -> frame
    streams: int = 0
    frames_received: int = 0
    frames_refused: int = 0
    frames_late: int = 0
    tiles_corrupt: int = 0
    bytes_received: int = 0
    last_sequence: int = 0
    last_receive_ns: int = 0
    last_error: str = ""
    refused_by_reason: dict[str, int] = field(default_factory=dict)

    def link_stats(self) -> LinkStats:
        return LinkStats(agent_id=self.agent_id, transport="grpc", frames_received=self.frames_received,
                         frames_refused=self.frames_refused, frames_late=self.frames_late,
                         tiles_corrupt=self.tiles_corrupt, bytes_received=self.bytes_received,
                         last_sequence=self.last_sequence, last_receive_time_ns=self.last_receive_ns)

    def counters(self) -> dict:
        return {"frames_received": self.frames_received, "frames_refused": self.frames_refused,
                "frames_late": self.frames_late, "tiles_corrupt": self.tiles_corrupt,
                "bytes_received": self.bytes_received, "streams": self.streams, "last_error": self.last_error,
                "refused_by_reason": dict(self.refused_by_reason)}


def _reason_key(message: str) -> str:
    """A short counter key for a refusal message (its words before the first number or colon)."""
    words = []
    for word in message.replace(":", " : ").split():
        if word == ":" or any(c.isdigit() for c in word):
            break
        words.append(word)
    return " ".join(words[:6]) or "refused"


class FusionNode(FusionServicer):
    """The ``cp.v1.Fusion`` service and its fusion loop (start with :meth:`start`)."""

    def __init__(self, config: FusionConfig, detector: BevDetector, codec: FeatureCodec | None,
                 device: torch.device | None = None) -> None:
        self.config = config
        self.device = device or next(detector.parameters()).device
        self.detector = detector.eval()
        self.codec = codec.eval() if codec is not None else None
        self.grid = expected_grid(detector, codec)
        self.precision = self.detector.set_precision(config.precision)
        # One thread does all torch work (decoding frames, fusing slots), so the warm-up leaves it warm.
        self._torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusion")
        self.period_ns = round(1e9 / config.rate_hz)
        self.agents: dict[int, AgentState] = {}
        self.connected: dict[int, int] = {}  # agent id -> open streams
        self.refused_streams: dict[str, int] = {}
        self.ticks = 0
        self.last_slot = -1
        self._forwarded: dict[tuple[int, int], None] = {}  # (agent, sequence) already sent to recorders
        self.subscribers: list[asyncio.Queue] = []
        self.subscriber_drops = 0
        self._arrival = asyncio.Event()
        self._stopping = asyncio.Event()
        self._server: FusionServer | None = None
        self._loop_task: asyncio.Task | None = None

    # ---- service --------------------------------------------------------------------------

    def _authenticate(self, context: grpc.aio.ServicerContext) -> tuple[int | None, tuple[str, str] | None]:
        """(agent id, None) when the call's credentials are good, else (None, (counter key, message))."""
        metadata = dict(context.invocation_metadata() or ())
        raw_id, token = metadata.get(AGENT_KEY), metadata.get(TOKEN_KEY, "")
        try:
            agent_id = int(raw_id)
        except (TypeError, ValueError):
            return None, ("no agent id", f"missing or malformed {AGENT_KEY} metadata ({raw_id!r})")
        if self.config.allow_any_agent:
            return agent_id, None
        if agent_id not in self.config.tokens:
            return None, ("unknown agent", f"unknown agent {agent_id}")
        if token != self.config.tokens[agent_id]:
            return None, ("wrong token", f"wrong token for agent {agent_id}")
        return agent_id, None

    async def Stream(self, request_iterator, context: grpc.aio.ServicerContext):
        agent_id, problem = self._authenticate(context)
        if problem is not None:
            key, message = problem
            self.refused_streams[key] = self.refused_streams.get(key, 0) + 1
            log.warning("refused a stream: %s", message)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        state = self.agents.setdefault(agent_id, AgentState(agent_id))
        state.streams += 1
        self.connected[agent_id] = self.connected.get(agent_id, 0) + 1
        log.info("agent %d connected (%s)", agent_id, context.peer())
        try:
            await context.send_initial_metadata(())
            await context.write(Control(target_frame_rate_hz=self.config.rate_hz))
            async for frame in request_iterator:
                await self._receive(state, frame)
        finally:
            self.connected[agent_id] -= 1
            if not self.connected[agent_id]:
                del self.connected[agent_id]
            self._arrival.set()
            log.info("agent %d disconnected", agent_id)

    async def _receive(self, state: AgentState, frame: FeatureFrame | MalformedFrame) -> None:
        now = time.time_ns()
        state.last_receive_ns = now
        try:
            if isinstance(frame, MalformedFrame):
                state.bytes_received += frame.size_bytes
                raise FrameRefused(frame.error)
            state.bytes_received += frame.ByteSize()
            if frame.agent_id != state.agent_id:
                raise FrameRefused(f"frame says agent {frame.agent_id} on agent {state.agent_id}'s stream")
            if frame.auth_token and frame.auth_token != self.config.tokens.get(state.agent_id, frame.auth_token):
                raise FrameRefused(f"frame carries a wrong token for agent {state.agent_id}")
            contribution = await asyncio.get_running_loop().run_in_executor(self._torch_thread, functools.partial(
                decode_frame, frame, detector=self.detector, codec=self.codec, grid=self.grid,
                receive_time_ns=now, max_payload_bytes=self.config.max_payload_bytes, device=self.device))
        except FrameRefused as err:
            state.frames_refused += 1
            state.last_error = str(err)
            key = _reason_key(str(err))
            state.refused_by_reason[key] = state.refused_by_reason.get(key, 0) + 1
            log.warning("agent %d frame %s refused: %s", state.agent_id, getattr(frame, "sequence", "?"), err)
            return
        state.frames_received += 1
        state.tiles_corrupt += contribution.tiles_refused
        state.last_sequence = frame.sequence
        slot = self.slot_of(contribution.capture_time_ns)
        if slot <= self.last_slot:
            state.frames_late += 1  # its slot was fused already: kept as the freshest evidence for later slots
        state.frames[slot] = contribution
        state.frames.move_to_end(slot)
        while len(state.frames) > FRAMES_KEPT:
            state.frames.popitem(last=False)
        self._arrival.set()

    async def Subscribe(self, request: SubscribeRequest, context: grpc.aio.ServicerContext):
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.config.subscriber_queue)
        self.subscribers.append(queue)
        await context.send_initial_metadata(())  # tells the subscriber it is registered
        min_gap_ns = int(1e9 / request.max_rate_hz) if request.max_rate_hz > 0 else 0
        last_ns = 0
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                fused, agent_frames = item
                if min_gap_ns and fused.publish_time_ns - last_ns < min_gap_ns:
                    continue
                last_ns = fused.publish_time_ns
                if request.min_score > 0 or request.agent_ids:
                    fused = self._filtered(fused, request)
                if request.include_agent_frames and agent_frames:
                    fused = _with_agent_frames(fused, agent_frames)
                yield fused
        finally:
            self.subscribers.remove(queue)

    @staticmethod
    def _filtered(fused: FusedFrame, request: SubscribeRequest) -> FusedFrame:
        out = FusedFrame()
        out.CopyFrom(fused)
        if request.min_score > 0:
            del out.boxes[:]
            out.boxes.extend(b for b in fused.boxes if b.score >= request.min_score)
        if request.agent_ids:
            wanted = set(request.agent_ids)
            del out.contributions[:]
            out.contributions.extend(c for c in fused.contributions if c.agent_id in wanted)
        return out

    # ---- fusion loop ----------------------------------------------------------------------

    def slot_of(self, capture_time_ns: int) -> int:
        return round(capture_time_ns / self.period_ns)

    def _newest_slot(self) -> int:
        return max((next(reversed(s.frames)) for s in self.agents.values() if s.frames), default=-1)

    def _complete(self, slot: int) -> bool:
        return all(any(k >= slot for k in self.agents[a].frames) for a in self.connected if a in self.agents)

    async def run(self) -> None:
        """Fuse slots as they fill (or their deadline passes) until :meth:`stop`."""
        while not self._stopping.is_set():
            slot = self._newest_slot()
            if slot <= self.last_slot:
                self._arrival.clear()
                await self._wait_arrival(None)
                continue
            deadline_ns = slot * self.period_ns + int(self.config.deadline_ms * 1e6)
            while not self._complete(slot) and not self._stopping.is_set():
                remaining = (deadline_ns - time.time_ns()) / 1e9
                if remaining <= 0:
                    break
                self._arrival.clear()
                if self._complete(slot):
                    break
                await self._wait_arrival(remaining)
            self.last_slot = slot  # from here on, a frame for this slot is late: fusing has begun
            item = await asyncio.get_running_loop().run_in_executor(self._torch_thread, self.fuse_slot, slot)
            self.ticks += 1
            self._publish(item)

    async def _wait_arrival(self, timeout_s: float | None) -> None:
        waiters = [asyncio.ensure_future(self._arrival.wait()), asyncio.ensure_future(self._stopping.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    def _pick(self, slot: int) -> list[tuple[Contribution, int]]:
        """Per agent: its frame for ``slot``, else its newest earlier one if young enough; with its status."""
        picked = []
        for state in sorted(self.agents.values(), key=lambda s: s.agent_id):
            earlier = [k for k in state.frames if k <= slot]
            if not earlier:
                continue
            k = max(earlier)
            age_ms = (slot - k) * self.period_ns / 1e6
            if k == slot:
                picked.append((state.frames[k], ContributionStatus.CONTRIBUTION_STATUS_FRESH))
            elif age_ms <= self.config.max_age_ms:
                picked.append((state.frames[k], ContributionStatus.CONTRIBUTION_STATUS_SUBSTITUTED))
        return picked

    @torch.no_grad()
    def fuse_slot(self, slot: int) -> tuple[FusedFrame, list[FeatureFrame]]:
        """Warp, merge and detect what is there for ``slot`` (runs in a worker thread)."""
        torch.set_num_threads(self.config.threads)
        start = time.perf_counter()
        picked = self._pick(slot)
        fused = FusedFrame(sequence=slot, fusion_time_ns=time.time_ns())
        if not picked:
            fused.publish_time_ns = time.time_ns()
            return fused, []
        ids = [c.agent_id for c, _ in picked]
        vehicles = [a for a in ids if a >= 0]
        ego = self.config.ego_agent_id if self.config.ego_agent_id in ids else min(vehicles, default=ids[0])
        reference = next(c for c, _ in picked if c.agent_id == ego)
        ref_from_world = invert_se3(reference.world_from_agent)
        ego_from_agent = np.stack([ref_from_world @ c.world_from_agent for c, _ in picked])
        features = torch.cat([c.features for c, _ in picked])
        valid = torch.cat([c.valid for c, _ in picked])
        merged = self.detector.fuse(features, torch.as_tensor(ego_from_agent, dtype=torch.float32,
                                                              device=self.device), valid=valid)
        fused_at = time.perf_counter()
        boxes = self.detector.detect(merged, score_threshold=self.config.score_threshold)[0].cpu().numpy()
        boxes = boxes[self.detector.grid.contains(boxes[:, :2])] if len(boxes) else boxes
        detected_at = time.perf_counter()
        intended = self.config.ego_agent_id if self.config.ego_agent_id is not None else min(
            (a for a in self.agents if a >= 0), default=ego)
        fused.ego_agent_id = ego
        fused.reference_pose.CopyFrom(pose_to_proto(reference.world_from_agent))
        fused.boxes.extend(boxes_to_proto(boxes[:, :9]))
        fused.capture_time_ns = (reference.capture_time_ns if ego == intended
                                 else max(c.capture_time_ns for c, _ in picked))
        fresh = ContributionStatus.CONTRIBUTION_STATUS_FRESH
        for c, status in picked:
            fused.contributions.append(AgentContribution(
                agent_id=c.agent_id, status=status, sequence=c.sequence,
                age_ms=(fused.fusion_time_ns - c.capture_time_ns) / 1e6,
                tiles_fresh=c.tiles if status == fresh else 0,
                tiles_substituted=c.tiles if status != fresh else 0))
        for agent_id, state in sorted(self.agents.items()):
            if agent_id not in ids:  # known, but nothing young enough to use
                newest = next(reversed(state.frames.values()), None) if state.frames else None
                fused.contributions.append(AgentContribution(
                    agent_id=agent_id, status=ContributionStatus.CONTRIBUTION_STATUS_MISSING,
                    sequence=newest.sequence if newest else 0,
                    age_ms=(fused.fusion_time_ns - newest.capture_time_ns) / 1e6 if newest else 0.0))
        fused.link_stats.extend(s.link_stats() for s in sorted(self.agents.values(), key=lambda s: s.agent_id))
        fused.stage_timings.extend([
            StageTiming(stage="decode", duration_ms=float(sum(c.decode_ms for c, _ in picked))),
            StageTiming(stage="warp_merge", duration_ms=(fused_at - start) * 1e3),
            StageTiming(stage="detect", duration_ms=(detected_at - fused_at) * 1e3)])
        fused.publish_time_ns = time.time_ns()
        fused.latency_ms = (fused.publish_time_ns - fused.capture_time_ns) / 1e6
        first_use = [c for c, _ in picked if c.message is not None and (c.agent_id, c.sequence) not in self._forwarded]
        self._forwarded.update(((c.agent_id, c.sequence), None) for c in first_use)
        while len(self._forwarded) > 64 * max(1, len(self.agents)):  # remember only the recent ones
            self._forwarded.pop(next(iter(self._forwarded)))
        return fused, [c.message for c in first_use]

    def _publish(self, item: tuple[FusedFrame, list[FeatureFrame]]) -> None:
        for queue in self.subscribers:
            if queue.full():
                queue.get_nowait()
                self.subscriber_drops += 1
            queue.put_nowait(item)

    # ---- lifecycle --------------------------------------------------------------------------

    @torch.no_grad()
    def warm_up(self) -> None:
        """Untimed passes of decoding (every rate level), merge and detection on empty features.

        torch's first pass through a module is slow: without this, the first frames an agent
        sends are decoded slowly enough to miss their slots' deadlines.
        """
        torch.set_num_threads(self.config.threads)
        shape = (2, self.grid.channels, self.grid.height_cells, self.grid.width_cells)
        features = torch.zeros(shape, device=self.device)
        if self.codec is not None:
            for level in range(self.codec.config.rate_levels):
                self.codec.decode(self.codec.encode(features[:1], level), device=self.device)
        poses = torch.eye(4, device=self.device).repeat(2, 1, 1)
        self.detector.detect(self.detector.fuse(features, poses), score_threshold=self.config.score_threshold)

    async def start(self) -> FusionServer:
        await asyncio.get_running_loop().run_in_executor(self._torch_thread, self.warm_up)
        self._server = await start_fusion_server(self, self.config.listen, self.config.tls.files())
        self._loop_task = asyncio.create_task(self.run())
        await self._server.set_serving(True)
        log.info("fusion node serving on port %d", self._server.port)
        return self._server

    async def stop(self) -> None:
        self._stopping.set()
        for queue in self.subscribers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)
        if self._loop_task is not None:
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._server is not None:
            await self._server.stop(0.5)
        self._torch_thread.shutdown(wait=False)

    def counters(self) -> dict:
        return {"ticks": self.ticks, "precision": self.precision, "refused_streams": dict(self.refused_streams),
                "subscriber_drops": self.subscriber_drops,
                "agents": {str(a): s.counters() for a, s in sorted(self.agents.items())}}


def _with_agent_frames(fused: FusedFrame, agent_frames: list[FeatureFrame]) -> FusedFrame:
    out = FusedFrame()
    out.CopyFrom(fused)
    out.agent_frames.extend(agent_frames)
    return out


def load_fusion_node(config: FusionConfig, root: Path = Path(".")) -> FusionNode:
    """Build the node from checkpoints (relative paths from ``root``); CUDA when present."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(config.threads)
    detector_path = config.detector if config.detector.is_absolute() else root / config.detector
    detector, _ = load_checkpoint(detector_path, map_location=device)
    codec = None
    if config.codec is not None:
        codec_path = config.codec if config.codec.is_absolute() else root / config.codec
        codec, _ = load_codec(codec_path, detector.config, map_location=device)
    return FusionNode(config, detector.to(device), codec.to(device) if codec is not None else None, device)
