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
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fusion.alignment import AgentView, CorrectionConfig, PoseCorrector, PoseHistory, planar_delta
from models.pose_filter import planar_to_pose_covariance
from fusion.receive import Contribution, FrameRefused, check_frame, decode_frame, expected_grid
from fusion.substitute import EvidenceMemory
from models.codec import FeatureCodec
from models.codec_train import load_codec
from models.detector import BevDetector, Precision, load_checkpoint
from models.geometry import invert_se3
from protos import (AgentContribution, ContributionStatus, Control, FeatureFrame, FusedFrame, FusionServicer, LinkReport,
                    LinkStats, StageTiming, SubscribeRequest)
from transport import (AGENT_KEY, TOKEN_KEY, FusionServer, MalformedFrame, TlsFiles, boxes_to_proto, pose_to_proto,
                       start_fusion_server)
from transport.datagram_link import DatagramServer, parse_address
from transport.deadline import AgentBuffer, Assembly, ChunkRefused

log = logging.getLogger(__name__)

FRAMES_KEPT = 8
"""Frames kept per agent (the newest few sequences): enough to fuse a slot while the next ones arrive,
and to take in a frame that comes a few periods late."""


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
    """Evidence older than this is not used: an agent's earlier tiles stand in for missing ones (weighted
    down by age, ``1 - age / max_age_ms``) while younger than this."""
    substitute: bool = True
    """Fill tiles (or whole frames) that did not arrive from the agent's earlier ones, moved by its
    ego-motion. ``false``: a missing tile is left out, a missing frame leaves the agent out."""
    chunk_grace_ms: float = Field(20.0, ge=0.0)
    """A frame that came in chunks is not waited for longer than this after its last chunk arrived
    (a frame's chunks leave back to back: the rest were lost)."""
    report_every_ms: float = Field(500.0, gt=0.0)
    """How often each agent is sent a ``Control`` with the link as this node sees it."""
    webrtc_listen: str | None = None
    """``host:port`` of the WebRTC signalling server (HTTP) for agents with ``transport: webrtc``
    (port 0: any free port); ``None``: gRPC only."""
    udp_listen: str | None = None
    """``host:port`` of the datagram socket for agents with ``transport: udp`` (port 0: any free port);
    ``None``: none."""
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
    correction: CorrectionConfig = CorrectionConfig()
    """Online pose correction: agents' poses tracked relative to the ego with their odometry and the objects
    they and the ego both detect (see :mod:`fusion.alignment`); steady errors are sent back on ``Control``."""
    latency_compensation: bool = True
    """Place the fused frame at the ego's pose at the slot's time (interpolated or extrapolated from its pose
    history) when the ego's own frame for the slot is missing, instead of at its last frame's pose."""

    @field_validator("udp_listen")
    @classmethod
    def _udp_address(cls, value: str | None) -> str | None:
        if value is not None:
            parse_address(value, listen=True)  # ValueError naming the address
        return value


class _RefusedAgain(Exception):
    """A frame whose decoding was refused before, as far as it had arrived then (on arrival or at a
    tick): not counted a second time."""


@dataclass(slots=True)
class AgentState:
    """Per-agent buffer, evidence memory and counters."""

    agent_id: int
    buffer: AgentBuffer
    transport: str = "grpc"
    decoded: dict[int, tuple[int, Contribution]] = field(default_factory=dict)  # sequence -> (revision, frame)
    taken: dict[int, int] = field(default_factory=dict)  # sequence -> revision taken into the memory
    memory: EvidenceMemory | None = None
    late_counted: set[int] = field(default_factory=set)
    refused_decoding: dict[int, int] = field(default_factory=dict)  # sequence -> revision refused (counted once)
    send_control: Callable[[Control], None] | None = None
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
    last_report: LinkReport = field(default_factory=LinkReport)
    latest: Contribution | None = None
    """The newest frame taken into the evidence memory (its pose, detections, odometry)."""
    history: PoseHistory = field(default_factory=PoseHistory)
    set_aside: dict[str, int] = field(default_factory=dict)
    """Parts of frames left out because they failed their checks (pose covariance, odometry, calibration)."""
    correction_sent: int = 0
    """Sequence of the last frame whose pose correction was sent to the agent (0: none)."""
    corrections_sent: int = 0
    correction_sizes: list[tuple[float, float]] = field(default_factory=list)
    """(metres, degrees) of each steady error sent, in order."""

    def link_stats(self) -> LinkStats:
        r = self.last_report
        return LinkStats(agent_id=self.agent_id, transport=self.transport, frames_received=self.frames_received,
                         frames_refused=self.frames_refused, frames_late=self.frames_late,
                         chunks_received=self.buffer.chunks_received, tiles_corrupt=self.tiles_corrupt,
                         bytes_received=self.bytes_received, loss_fraction=r.loss_fraction,
                         delivered_bitrate_bps=r.delivered_bitrate_bps, last_sequence=self.last_sequence,
                         last_receive_time_ns=self.last_receive_ns)

    def counters(self) -> dict:
        return {"transport": self.transport, "frames_received": self.frames_received,
                "frames_refused": self.frames_refused, "frames_late": self.frames_late,
                "chunks_received": self.buffer.chunks_received, "chunks_refused": self.buffer.chunks_refused,
                "tiles_corrupt": self.tiles_corrupt, "bytes_received": self.bytes_received, "streams": self.streams,
                "last_error": self.last_error, "refused_by_reason": dict(self.refused_by_reason),
                "set_aside": dict(self.set_aside), "pose_corrections_sent": self.corrections_sent,
                "pose_correction_sizes": [[round(m, 3), round(d, 3)] for m, d in self.correction_sizes[-32:]]}


@dataclass(frozen=True, slots=True)
class _FrameView:
    """A snapshot of one frame's arrival, for the torch thread."""

    sequence: int
    revision: int
    capture_time_ns: int
    last_receive_ns: int
    chunk_count: int
    chunks: int
    tile_count: int
    message: FeatureFrame | None

    @classmethod
    def of(cls, a: Assembly, with_message: bool) -> _FrameView:
        return cls(a.sequence, a.revision, a.capture_time_ns, a.last_receive_ns, a.chunk_count, len(a.chunks),
                   a.header.tile_count, a.message() if with_message else None)


def _reason_key(message: str) -> str:
    """A short counter key for a refusal message (its words before the first number or colon)."""
    words = []
    for word in message.replace(":", " : ").split():
        if word == ":" or any(c.isdigit() for c in word):
            break
        words.append(word)
    return " ".join(words[:6]) or "refused"


class FusionNode(FusionServicer):
    """The ``cp.v1.Fusion`` service (and the WebRTC signalling server) and the fusion loop (:meth:`start`)."""

    def __init__(self, config: FusionConfig, detector: BevDetector, codec: FeatureCodec | None,
                 device: torch.device | None = None) -> None:
        self.config = config
        self.device = device or next(detector.parameters()).device
        self.detector = detector.eval()
        self.codec = codec.eval() if codec is not None else None
        self.grid = expected_grid(detector, codec)
        self.tile_cells = codec.config.tile_cells * codec.config.latent_stride if codec is not None else 0
        self.precision = self.detector.set_precision(config.precision)
        # One thread does all torch work (decoding frames, fusing slots), so the warm-up leaves it warm.
        self._torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusion")
        self.period_ns = round(1e9 / config.rate_hz)
        self.agents: dict[int, AgentState] = {}
        self.connected: dict[int, int] = {}  # agent id -> open streams
        self.refused_streams: dict[str, int] = {}
        self.ticks = 0
        self.fuse_errors = 0
        self.last_slot = -1
        self._forwarded: dict[tuple[int, int], None] = {}  # (agent, sequence) already sent to recorders
        self.subscribers: list[asyncio.Queue] = []
        self.subscriber_drops = 0
        self._arrival = asyncio.Event()
        self._stopping = asyncio.Event()
        self._server: FusionServer | None = None
        self._webrtc = None  # transport.webrtc_link.WebRtcServer when webrtc_listen is set
        self.webrtc_port: int | None = None
        self._udp = None  # transport.datagram_link.DatagramServer when udp_listen is set
        self.udp_port: int | None = None
        self._loop_task: asyncio.Task | None = None
        self._report_task: asyncio.Task | None = None
        self._receiving: set[asyncio.Task] = set()
        self.corrector = PoseCorrector(config.correction)
        self._controls: list[tuple[int, Control]] = []  # pose corrections from the torch thread, sent by the loop

    # ---- service --------------------------------------------------------------------------

    def _check_credentials(self, agent_id: int, token: str) -> tuple[str, str] | None:
        """None when ``token`` is good for ``agent_id``, else (counter key, message)."""
        if self.config.allow_any_agent:
            return None
        if agent_id not in self.config.tokens:
            return "unknown agent", f"unknown agent {agent_id}"
        if token != self.config.tokens[agent_id]:
            return "wrong token", f"wrong token for agent {agent_id}"
        return None

    def _admit_counted(self, agent_id: int, token: str) -> str | None:
        """For the WebRTC and datagram servers: ``None`` admits, else the refusal (counted)."""
        problem = self._check_credentials(agent_id, token)
        if problem is not None:
            self.refused_streams[problem[0]] = self.refused_streams.get(problem[0], 0) + 1
        return problem[1] if problem is not None else None

    def _authenticate(self, context: grpc.aio.ServicerContext) -> tuple[int | None, tuple[str, str] | None]:
        """(agent id, None) when the call's credentials are good, else (None, (counter key, message))."""
        metadata = dict(context.invocation_metadata() or ())
        raw_id, token = metadata.get(AGENT_KEY), metadata.get(TOKEN_KEY, "")
        try:
            agent_id = int(raw_id)
        except (TypeError, ValueError):
            return None, ("no agent id", f"missing or malformed {AGENT_KEY} metadata ({raw_id!r})")
        problem = self._check_credentials(agent_id, token)
        return (None, problem) if problem is not None else (agent_id, None)

    def _state(self, agent_id: int, transport: str) -> AgentState:
        state = self.agents.get(agent_id)
        if state is None:
            state = self.agents[agent_id] = AgentState(agent_id, AgentBuffer(
                agent_id, keep=FRAMES_KEPT, chunk_grace_ms=self.config.chunk_grace_ms))
        state.transport = transport
        return state

    def _joined(self, agent_id: int) -> None:
        self.connected[agent_id] = self.connected.get(agent_id, 0) + 1

    def _left(self, agent_id: int) -> None:
        self.connected[agent_id] = self.connected.get(agent_id, 1) - 1
        if self.connected[agent_id] <= 0:
            del self.connected[agent_id]
        self._arrival.set()

    async def Stream(self, request_iterator, context: grpc.aio.ServicerContext):
        agent_id, problem = self._authenticate(context)
        if problem is not None:
            key, message = problem
            self.refused_streams[key] = self.refused_streams.get(key, 0) + 1
            log.warning("refused a stream: %s", message)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        state = self._state(agent_id, "grpc")
        state.streams += 1
        self._joined(agent_id)
        log.info("agent %d connected (%s)", agent_id, context.peer())
        controls: asyncio.Queue[Control] = asyncio.Queue(maxsize=4)

        def send(control: Control) -> None:  # latest wins: a slow stream keeps only the newest reports
            if controls.full():
                controls.get_nowait()
            controls.put_nowait(control)

        async def write_controls() -> None:
            while True:
                await context.write(await controls.get())

        state.send_control = send
        writer = None
        try:
            await context.send_initial_metadata(())
            await context.write(Control(target_frame_rate_hz=self.config.rate_hz))
            writer = asyncio.create_task(write_controls())
            async for frame in request_iterator:
                size = frame.size_bytes if isinstance(frame, MalformedFrame) else frame.ByteSize()
                await self._receive(state, frame, size)
        finally:
            if writer is not None:
                writer.cancel()
            if state.send_control is send:
                state.send_control = None
            self._left(agent_id)
            log.info("agent %d disconnected", agent_id)

    def _chunk_received(self, agent_id: int, data: bytes, receive_ns: int, transport: str = "webrtc") -> None:
        """A chunk from an agent's WebRTC ``features`` channel or datagram link (on the event loop;
        parsing is cheap)."""
        state = self._state(agent_id, transport)
        try:
            frame: FeatureFrame | MalformedFrame = FeatureFrame.FromString(data)
        except DecodeError as err:
            frame = MalformedFrame(len(data), f"malformed FeatureFrame chunk of {len(data)} bytes: {err}")
        task = asyncio.get_running_loop().create_task(self._receive(state, frame, len(data), receive_ns))
        self._receiving.add(task)
        task.add_done_callback(self._receiving.discard)

    def _chunk_link_up(self, agent_id: int, transport: str = "webrtc") -> None:
        state = self._state(agent_id, transport)
        state.streams += 1
        state.send_control = functools.partial(self._chunk_link_send, agent_id, transport)
        self._joined(agent_id)
        log.info("agent %d connected over %s", agent_id, transport)
        state.send_control(Control(target_frame_rate_hz=self.config.rate_hz))

    def _chunk_link_send(self, agent_id: int, transport: str, control: Control) -> None:
        server = self._webrtc if transport == "webrtc" else self._udp
        if server is not None:
            server.send_control(agent_id, control)

    def _chunk_link_down(self, agent_id: int, transport: str = "webrtc") -> None:
        if agent_id in self.agents:
            self.agents[agent_id].send_control = None
        self._left(agent_id)
        log.info("agent %d disconnected (%s)", agent_id, transport)

    def _refuse(self, state: AgentState, frame, message: str) -> None:
        state.frames_refused += 1
        state.last_error = message
        key = _reason_key(message)
        state.refused_by_reason[key] = state.refused_by_reason.get(key, 0) + 1
        log.warning("agent %d frame %s refused: %s", state.agent_id, getattr(frame, "sequence", "?"), message)

    async def _receive(self, state: AgentState, frame: FeatureFrame | MalformedFrame, wire_bytes: int,
                       receive_ns: int | None = None) -> None:
        """One frame or chunk: check it, add it to its frame, decode the frame once it is complete."""
        now = receive_ns or time.time_ns()
        state.last_receive_ns = now
        state.bytes_received += wire_bytes
        try:
            if isinstance(frame, MalformedFrame):
                raise FrameRefused(frame.error)
            if frame.agent_id != state.agent_id:
                raise FrameRefused(f"frame says agent {frame.agent_id} on agent {state.agent_id}'s stream")
            if frame.auth_token and frame.auth_token != self.config.tokens.get(state.agent_id, frame.auth_token):
                raise FrameRefused(f"frame carries a wrong token for agent {state.agent_id}")
            check_frame(frame, codec=self.codec, grid=self.grid, max_payload_bytes=self.config.max_payload_bytes)
            assembly = state.buffer.add(frame, now, wire_bytes)
        except (FrameRefused, ChunkRefused) as err:
            self._refuse(state, frame, str(err))
            return
        first_chunk = assembly.revision == 1
        state.last_sequence = max(state.last_sequence, frame.sequence)
        slot = self.slot_of(assembly.capture_time_ns)
        if slot <= self.last_slot and assembly.sequence not in state.late_counted:
            state.frames_late += 1  # its slot was fused already: kept as evidence for later slots
            state.late_counted.add(assembly.sequence)
            if len(state.late_counted) > 4 * FRAMES_KEPT:
                state.late_counted.discard(min(state.late_counted))
        if assembly.complete:
            try:
                await asyncio.get_running_loop().run_in_executor(self._torch_thread, self._decoded, state,
                                                                 _FrameView.of(assembly, with_message=True))
            except (FrameRefused, _RefusedAgain) as err:
                if isinstance(err, FrameRefused):
                    self._refuse(state, frame, str(err))
                state.buffer.frames.pop(assembly.sequence, None)
                return
        if first_chunk:
            state.frames_received += 1
        self._arrival.set()

    def _decoded(self, state: AgentState, view: _FrameView) -> Contribution:
        """The frame's features as far as it has arrived (decoded again only when more came; torch thread)."""
        cached = state.decoded.get(view.sequence)
        if cached is not None and cached[0] >= view.revision:
            return cached[1]
        if state.refused_decoding.get(view.sequence, -1) >= view.revision:
            raise _RefusedAgain(view.sequence)
        try:
            contribution = decode_frame(view.message, detector=self.detector, codec=self.codec, grid=self.grid,
                                        receive_time_ns=view.last_receive_ns,
                                        max_payload_bytes=self.config.max_payload_bytes, device=self.device)
        except FrameRefused:  # the arrival and a tick may both try a complete frame: it is refused once
            state.refused_decoding[view.sequence] = view.revision
            if len(state.refused_decoding) > 4 * FRAMES_KEPT:
                del state.refused_decoding[min(state.refused_decoding)]
            raise
        if cached is None:
            state.tiles_corrupt += contribution.tiles_refused
        state.decoded[view.sequence] = (view.revision, contribution)
        while len(state.decoded) > FRAMES_KEPT:
            del state.decoded[min(state.decoded)]
        return contribution

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

    def _slots(self, state: AgentState) -> dict[int, Assembly]:
        """The agent's kept frames by fusion slot (a later sequence wins a shared slot)."""
        return {self.slot_of(a.capture_time_ns): a for _, a in sorted(state.buffer.frames.items())}

    def _newest_slot(self) -> int:
        return max((self.slot_of(a.capture_time_ns) for s in self.agents.values() for a in s.buffer.frames.values()),
                   default=-1)

    def _delivered(self, slot: int, now_ns: int) -> tuple[bool, int | None]:
        """Whether every connected agent has delivered ``slot`` (a settled frame for it, or any later
        frame) or is not worth waiting for any more (nothing of the slot's frame has come although
        the link's recent frames had begun to arrive by now), and when to look again."""
        wake = None
        for agent in self.connected:
            state = self.agents.get(agent)
            if state is None:
                continue
            slots = self._slots(state)
            if any(k > slot for k in slots):
                continue
            frame = slots.get(slot)
            if frame is None:
                give_up = state.buffer.give_up_time_ns(slot * self.period_ns, self.config.chunk_grace_ms)
                if give_up is not None and now_ns >= give_up:
                    continue  # lost (or far behind): fused without it, substituted if possible
                if give_up is not None:
                    wake = give_up if wake is None else min(wake, give_up)
                return False, wake
            if not state.buffer.settled(frame, now_ns):
                settle = state.buffer.settle_time_ns(frame)
                wake = settle if wake is None else min(wake, settle)
                return False, wake
        return True, wake

    async def run(self) -> None:
        """Fuse slots as they fill (or their deadline passes) until :meth:`stop`."""
        while not self._stopping.is_set():
            slot = self._newest_slot()
            if slot <= self.last_slot:
                self._arrival.clear()
                await self._wait_arrival(None)
                continue
            deadline_ns = slot * self.period_ns + int(self.config.deadline_ms * 1e6)
            while not self._stopping.is_set():
                self._arrival.clear()
                done, wake_ns = self._delivered(slot, time.time_ns())
                if done:
                    break
                remaining = (min(deadline_ns, wake_ns or deadline_ns) - time.time_ns()) / 1e9
                if remaining <= 0 and time.time_ns() >= deadline_ns:
                    break
                await self._wait_arrival(max(remaining, 0.0))
            self.last_slot = slot  # from here on, a frame for this slot is late: fusing has begun
            plan = self._plan(slot)
            try:
                item = await asyncio.get_running_loop().run_in_executor(self._torch_thread, self.fuse_slot, slot,
                                                                        plan)
            except Exception:  # a bug must not stop the node: this slot is lost, the next ones are fused
                log.exception("fusing slot %d failed", slot)
                self.fuse_errors += 1
                continue
            self.ticks += 1
            self._send_corrections()
            self._publish(item)

    async def _wait_arrival(self, timeout_s: float | None) -> None:
        waiters = [asyncio.ensure_future(self._arrival.wait()), asyncio.ensure_future(self._stopping.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    def _plan(self, slot: int) -> dict[int, dict[int, _FrameView]]:
        """Per agent, its frames up to ``slot`` by slot, as they are now (taken on the event loop, so that
        chunks arriving while the slot is fused do not change what the torch thread reads)."""
        plan = {}
        for agent_id, state in self.agents.items():
            plan[agent_id] = {k: _FrameView.of(a, with_message=state.taken.get(a.sequence) != a.revision)
                              for k, a in self._slots(state).items() if k <= slot}
        return plan

    def _evidence(self, state: AgentState, slot: int, slots: dict[int, _FrameView]):
        """Take the agent's frames up to ``slot`` into its memory; its evidence for ``slot`` (or None),
        the slot's own frame (or None) and the newest frame taken. Runs in the torch thread."""
        newest = None
        for k in sorted(slots):
            if k > slot:
                break
            frame = slots[k]
            newest = frame
            if state.taken.get(frame.sequence) == frame.revision:
                continue
            try:
                c = self._decoded(state, frame)
            except (FrameRefused, _RefusedAgain) as err:
                if isinstance(err, FrameRefused):
                    self._refuse(state, frame.message, str(err))
                state.taken[frame.sequence] = frame.revision
                continue
            if state.memory is None:
                state.memory = EvidenceMemory(self.detector.grid, self.tile_cells, frame.capture_time_ns)
            state.memory.take(c.features, c.valid, c.world_from_agent, frame.capture_time_ns)
            state.taken[frame.sequence] = frame.revision
            self._take_pose(state, c)
        while len(state.taken) > 2 * FRAMES_KEPT:
            del state.taken[min(state.taken)]
        if state.memory is None or newest is None:
            return None, None, newest
        own = slots.get(slot)
        tile_count = max(1, (own or newest).tile_count)
        evidence = state.memory.evidence(slot * self.period_ns, self.config.max_age_ms, self.config.substitute,
                                         own.capture_time_ns if own is not None else None, tile_count)
        return evidence, own, newest

    def _take_pose(self, state: AgentState, c: Contribution) -> None:
        """Remember a taken frame's pose (history, newest frame) and count what of it was set aside."""
        if state.latest is None or c.capture_time_ns >= state.latest.capture_time_ns:
            state.latest = c
        state.history.add(c.capture_time_ns, c.world_from_agent)
        for reason in c.set_aside:
            key = reason.split(":")[0]
            state.set_aside[key] = state.set_aside.get(key, 0) + 1
            log.warning("agent %d frame %d: %s; used without it", state.agent_id, c.sequence, reason)

    def _reference_pose(self, reference: tuple, slot: int) -> tuple[np.ndarray, int]:
        """The ego's pose the fused frame is given in, and its time: the ego's frame for this slot, or, when that
        is missing, its pose at the slot's time from its pose history (latency compensation)."""
        state, evidence, own = reference[0], reference[1], reference[2]
        if own is not None or not self.config.latency_compensation:
            return evidence.world_from_agent, own.capture_time_ns if own is not None else slot * self.period_ns
        at = state.history.at(slot * self.period_ns)
        return (evidence.world_from_agent if at is None else at), slot * self.period_ns

    def _correct(self, used: list, reference: tuple, ego_from_agent: np.ndarray,
                 world_from_reference: np.ndarray) -> dict:
        """Corrected ``ego_from_agent`` rows (in place) for the agents whose newest frame is the one fused;
        returns the corrections by agent id.

        Tracks are kept relative to the ego's newest frame (the fused frame may sit elsewhere, see
        :meth:`_reference_pose`). An agent whose newest frame was captured at another time than the
        ego's is not matched by objects (they moved in between); its track goes on with odometry."""
        ref_state, ref_evidence = reference[0], reference[1]
        ego = ref_state.latest
        if (not self.config.correction.enabled or ego is None
                or not np.array_equal(ego.world_from_agent, ref_evidence.world_from_agent)):
            return {}
        ego_from_world = invert_se3(ego.world_from_agent)
        views, rows = {}, {}
        for i, (state, evidence, *_rest) in enumerate(used):
            c = state.latest
            if c is None or not np.array_equal(c.world_from_agent, evidence.world_from_agent):
                continue
            detections, scan = c.detections, c.scan
            if abs(c.capture_time_ns - ego.capture_time_ns) > self.period_ns // 2:
                detections, scan = detections[:0], None  # the world moved in between
            views[state.agent_id] = AgentView(state.agent_id, ego_from_world @ c.world_from_agent, detections,
                                              c.pose_sigma, c.sequence, c.odom_from_agent, c.odometry_sigma, scan,
                                              None if c.own_pose is None else ego_from_world @ c.own_pose,
                                              c.own_pose_sigma)
            rows[state.agent_id] = i
        reference_view = views.pop(ref_state.agent_id, None)
        if reference_view is None or not views:
            return {}
        corrections = self.corrector.correct(reference_view, list(views.values()))
        output_from_ego = invert_se3(world_from_reference) @ ego.world_from_agent
        for agent_id, correction in corrections.items():
            ego_from_agent[rows[agent_id]] = output_from_ego @ correction.ref_from_agent
        self._queue_feedback(used, corrections, ego.world_from_agent)
        return corrections

    def _queue_feedback(self, used: list, corrections: dict, world_from_ego: np.ndarray) -> None:
        """Send an agent that tracks its pose (its frames carry ``own_pose``) every estimate this frame measured,
        with its covariance; send any other its steady pose error once its window shows one (only frames that
        carry the last correction sent count towards the next)."""
        for state, *_rest in used:
            c = state.latest
            if state.agent_id not in corrections or c is None:
                continue
            correction = corrections[state.agent_id]
            if c.own_pose is not None:
                if correction.applied and correction.measured and correction.covariance is not None:
                    self._queue_control(state, c.sequence, world_from_ego @ correction.ref_from_agent,
                                        correction.delta, planar_to_pose_covariance(correction.covariance))
                continue
            if c.pose_correction_sequence < state.correction_sent:
                self.corrector.forget(state.agent_id)  # still the frames sent before the last correction
                continue
            steady = self.corrector.steady_error(state.agent_id)
            if steady is not None:
                self._queue_control(state, c.sequence, c.world_from_agent @ steady, planar_delta(steady))
                self.corrector.forget(state.agent_id)

    def _queue_control(self, state: AgentState, sequence: int, estimate: np.ndarray, delta: np.ndarray,
                       covariance: np.ndarray | None = None) -> None:
        """Queue a pose correction for ``state``'s agent (its frame ``sequence`` is at ``estimate``, moved by
        ``delta``: x, y, heading) and count it."""
        self._controls.append((state.agent_id, Control(pose_correction=pose_to_proto(estimate, covariance),
                                                       pose_correction_sequence=sequence)))
        state.correction_sent = sequence
        state.corrections_sent += 1
        state.correction_sizes.append((float(np.hypot(*delta[:2])), float(np.degrees(abs(delta[2])))))

    def _send_corrections(self) -> None:
        controls, self._controls = self._controls, []
        for agent_id, control in controls:
            state = self.agents.get(agent_id)
            if state is not None and state.send_control is not None:
                state.send_control(control)
                log.info("agent %d: sent a pose correction for frame %d", agent_id, control.pose_correction_sequence)

    @torch.no_grad()
    def fuse_slot(self, slot: int, plan: dict[int, dict[int, _FrameView]] | None = None
                  ) -> tuple[FusedFrame, list[FeatureFrame]]:
        """Substitute, warp, merge and detect what is there for ``slot`` (runs in the torch thread;
        ``plan`` is :meth:`_plan`'s snapshot, taken now when not given)."""
        torch.set_num_threads(self.config.threads)
        plan = self._plan(slot) if plan is None else plan
        start = time.perf_counter()
        fused = FusedFrame(sequence=slot, fusion_time_ns=time.time_ns())
        status = ContributionStatus
        used, missing = [], []
        for state in sorted(self.agents.values(), key=lambda s: s.agent_id):
            evidence, own, newest = self._evidence(state, slot, plan.get(state.agent_id, {}))
            if evidence is None:
                missing.append((state, newest))
                continue
            if own is None or evidence.substituted_tiles:
                kind = status.CONTRIBUTION_STATUS_SUBSTITUTED
            elif evidence.dropped_tiles:
                kind = status.CONTRIBUTION_STATUS_PARTIAL
            else:
                kind = status.CONTRIBUTION_STATUS_FRESH
            used.append((state, evidence, own, newest, kind))
        decoded_at = time.perf_counter()
        if not used:
            fused.publish_time_ns = time.time_ns()
            return fused, []
        ids = [s.agent_id for s, *_ in used]
        vehicles = [a for a in ids if a >= 0]
        ego = self.config.ego_agent_id if self.config.ego_agent_id in ids else min(vehicles, default=ids[0])
        reference = next(u for u in used if u[0].agent_id == ego)
        world_from_reference, reference_time_ns = self._reference_pose(reference, slot)
        ref_from_world = invert_se3(world_from_reference)
        ego_from_agent = np.stack([ref_from_world @ e.world_from_agent for _, e, *_ in used])
        corrections = self._correct(used, reference, ego_from_agent, world_from_reference)
        features = torch.cat([e.features for _, e, *_ in used])
        weight = torch.cat([e.weight for _, e, *_ in used])
        merged = self.detector.fuse(features, torch.as_tensor(ego_from_agent, dtype=torch.float32,
                                                              device=self.device), valid=weight)
        fused_at = time.perf_counter()
        boxes = self.detector.detect(merged, fused=True, score_threshold=self.config.score_threshold)[0].cpu().numpy()
        boxes = boxes[self.detector.grid.contains(boxes[:, :2])] if len(boxes) else boxes
        detected_at = time.perf_counter()
        intended = self.config.ego_agent_id if self.config.ego_agent_id is not None else min(
            (a for a in self.agents if a >= 0), default=ego)
        fused.ego_agent_id = ego
        fused.reference_pose.CopyFrom(pose_to_proto(world_from_reference))
        ego_latest = reference[0].latest
        if ego_latest is not None and ego_latest.own_pose is not None:  # the same world shift at the slot's pose
            fused.reference_own_pose.CopyFrom(pose_to_proto(
                ego_latest.own_pose @ invert_se3(ego_latest.world_from_agent) @ world_from_reference))
        fused.boxes.extend(boxes_to_proto(boxes[:, :9]))
        ref_own = reference[2]
        fused.capture_time_ns = (ref_own.capture_time_ns if ego == intended and ref_own is not None
                                 else max(n.capture_time_ns for _, _, _, n, _ in used))
        if ref_own is None and self.config.latency_compensation:
            fused.capture_time_ns = max(fused.capture_time_ns, reference_time_ns)
        for state, e, own, newest, kind in used:
            fused.contributions.append(AgentContribution(
                agent_id=state.agent_id, status=kind, sequence=newest.sequence,
                age_ms=(fused.fusion_time_ns - newest.capture_time_ns) / 1e6, tiles_fresh=e.fresh_tiles,
                tiles_substituted=e.substituted_tiles, tiles_dropped=e.dropped_tiles,
                substituted_age_ms=e.substituted_age_ms, substituted_max_age_ms=e.substituted_max_age_ms,
                chunks_missing=(own.chunk_count - own.chunks) if own is not None else 0,
                **_correction_fields(corrections.get(state.agent_id))))
        for state, newest in missing:  # known, but nothing young enough to use
            fused.contributions.append(AgentContribution(
                agent_id=state.agent_id, status=status.CONTRIBUTION_STATUS_MISSING,
                sequence=newest.sequence if newest else 0,
                age_ms=(fused.fusion_time_ns - newest.capture_time_ns) / 1e6 if newest else 0.0))
        fused.link_stats.extend(s.link_stats() for s in sorted(self.agents.values(), key=lambda s: s.agent_id))
        fused.stage_timings.extend([
            StageTiming(stage="decode_substitute", duration_ms=(decoded_at - start) * 1e3),
            StageTiming(stage="warp_merge", duration_ms=(fused_at - decoded_at) * 1e3),
            StageTiming(stage="detect", duration_ms=(detected_at - fused_at) * 1e3)])
        fused.publish_time_ns = time.time_ns()
        fused.latency_ms = (fused.publish_time_ns - fused.capture_time_ns) / 1e6
        first_use = [(s.agent_id, n) for s, _, _, n, _ in used if (s.agent_id, n.sequence) not in self._forwarded]
        self._forwarded.update(((a, n.sequence), None) for a, n in first_use)
        while len(self._forwarded) > 64 * max(1, len(self.agents)):  # remember only the recent ones
            self._forwarded.pop(next(iter(self._forwarded)))
        return fused, [n.message for _, n in first_use if n.message is not None] if self.subscribers else []

    async def _report_links(self) -> None:
        """Every ``report_every_ms``: tell each connected agent how its link looks from here."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.config.report_every_ms / 1e3)
                return
            now = time.time_ns()
            for agent_id in list(self.connected):
                state = self.agents.get(agent_id)
                if state is None:
                    continue
                state.last_report = state.buffer.report(now)
                state.last_report.frames_late = state.frames_late
                if state.send_control is not None:
                    state.send_control(Control(link=state.last_report))

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
        self.detector.detect(self.detector.fuse(features, poses), fused=True, score_threshold=self.config.score_threshold)

    async def start(self) -> FusionServer:
        await asyncio.get_running_loop().run_in_executor(self._torch_thread, self.warm_up)
        self._server = await start_fusion_server(self, self.config.listen, self.config.tls.files())
        if self.config.webrtc_listen is not None:
            from transport.webrtc_link import WebRtcServer  # aiortc is imported only where WebRTC is used

            self._webrtc = WebRtcServer(on_chunk=self._chunk_received, authenticate=self._admit_counted,
                                        on_connect=self._chunk_link_up, on_disconnect=self._chunk_link_down)
            host, _, port = self.config.webrtc_listen.rpartition(":")
            self.webrtc_port = await self._webrtc.start(host or "0.0.0.0", int(port))
            log.info("WebRTC signalling on port %d", self.webrtc_port)
        if self.config.udp_listen is not None:
            self._udp = DatagramServer(on_chunk=functools.partial(self._chunk_received, transport="udp"),
                                       authenticate=self._admit_counted,
                                       on_connect=functools.partial(self._chunk_link_up, transport="udp"),
                                       on_disconnect=functools.partial(self._chunk_link_down, transport="udp"))
            self.udp_port = await self._udp.start(*parse_address(self.config.udp_listen, listen=True))
            log.info("datagrams on UDP port %d", self.udp_port)
        self._loop_task = asyncio.create_task(self.run())
        self._report_task = asyncio.create_task(self._report_links())
        await self._server.set_serving(True)
        log.info("fusion node serving on port %d", self._server.port)
        return self._server

    async def stop(self) -> None:
        self._stopping.set()
        for queue in self.subscribers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)
        for task in (self._loop_task, self._report_task):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
        if self._webrtc is not None:
            await self._webrtc.stop()
        if self._udp is not None:
            await self._udp.stop()
        if self._server is not None:
            await self._server.stop(0.5)
        self._torch_thread.shutdown(wait=False)

    def counters(self) -> dict:
        return {"ticks": self.ticks, "fuse_errors": self.fuse_errors, "precision": self.precision, "refused_streams": dict(self.refused_streams),
                "subscriber_drops": self.subscriber_drops,
                **({"datagrams": self._udp.stats()} if self._udp is not None else {}),
                "pose_correction": {str(a): c.as_dict() for a, c in sorted(self.corrector.counters.items())},
                "agents": {str(a): s.counters() for a, s in sorted(self.agents.items())}}


def _correction_fields(correction) -> dict:
    if correction is None or not correction.applied:
        return {}
    return {"pose_corrected": True, "pose_correction_m": float(np.hypot(*correction.delta[:2])),
            "pose_correction_deg": float(np.degrees(abs(correction.delta[2]))),
            "matched_objects": correction.matches}


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
