"""The agent node: sensor frames -> BEV features -> codec -> ``FeatureFrame``s to the fusion node.

One process per agent. Frames come from a source (the synthetic world rendered
live, or an OPV2V-layout folder) on a sensor clock: frame ``k`` is captured at
``start_time_ns + k / rate_hz``, the same clock for every agent of a launch, so the
fusion node can line frames up by capture time. When the model falls behind, the
agent skips to the newest sensor frame instead of queueing (latest wins), and its
uplink replaces a frame gRPC has not taken yet. Each frame carries the agent's own
object list, its pose (the BEV frame's place in the world) and the grid spec.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agents.frames import AgentFrame
from agents.odometry import LidarOdometry, OdometryConfig, OdometryStep
from agents.opv2v import DatasetError, Scenario, read_agent_frame
from agents.pose import CorrectionRefused, PoseCorrectionConfig, ReportedPose, TrackedPose
from agents.world import SyntheticWorld, WorldConfig
from agents.world.crossing import CrossingConfig, CrossingWorld
from models.bev import aligned_bev_frame
from models.camera import CameraInputError, GroundSampling, check_image
from models.codec import CodedTile, FeatureCodec
from models.codec_train import load_codec
from models.detector import BevDetector, Precision, load_checkpoint
from models.geometry import invert_se3, transform_boxes, transform_points
from models.pose_filter import (PlanarSigma, orthonormal, planar_to_pose_covariance, pose_covariance_sigma,
                                pose_to_planar_covariance, sigma_covariance)
from models.scan import ScanConfig, pack_scan, scan_due, thin_scan
from protos import Control, FeatureDtype, FeatureFrame
from transport import (RAW_CODEC_ID, FeatureUplink, FramingError, GridSpec, LinkError, TlsFiles, feature_frame,
                       pose_from_proto)
from transport.rate import RateConfig, RateController

log = logging.getLogger(__name__)

TOKEN_ENV = "CPSTREAM_TOKEN"
"""Environment variable an agent reads its token from when the config leaves it empty."""


def ground_pose(agent: AgentFrame, true: bool = False) -> np.ndarray:
    """``world_from_ground``: the LiDAR pose moved down to the ground (world z = 0 is the ground).

    The reported pose is what the system knows and fuses with; ``true=True``
    takes the exact one when the data has it (for placing ground truth).
    """
    exact = true and agent.true_world_from_lidar is not None
    pose = (agent.true_world_from_lidar if exact else agent.world_from_lidar).copy()
    pose[2, 3] = 0.0
    return pose


def ground_points(agent: AgentFrame) -> np.ndarray:
    """The agent's points ``[N, 4]`` in its ground frame (z = height above the ground)."""
    points = agent.points.copy()
    points[:, 2] += np.float32(agent.world_from_lidar[2, 3])
    return points


def bev_input(agent: AgentFrame, lattice_m: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(``world_from_bev``, ``bev_from_ground``, points ``[N, 4]`` in the BEV frame) from the reported pose.

    The BEV frame is :func:`models.bev.aligned_bev_frame` of the agent's ground pose on the
    detector's feature lattice: what the agent computes features in and reports as its pose.
    """
    world_from_bev, bev_from_ground = aligned_bev_frame(ground_pose(agent), lattice_m)
    points = transform_points(bev_from_ground, ground_points(agent)).astype(np.float32)
    return world_from_bev, bev_from_ground, points


def _odometry_fields(step: OdometryStep, ground_from_bev: np.ndarray) -> dict:
    """A frame's ``odom_from_agent`` (its BEV frame in the odometry frame) and the step's ``[6, 6]`` covariance."""
    covariance = np.diag([step.sigma_xy_m ** 2, step.sigma_xy_m ** 2, 0.0, 0.0, 0.0, step.sigma_yaw_rad ** 2])
    return {"odom_from_agent": step.odom_from_ground @ ground_from_bev, "odometry_covariance": covariance}


class SourceConfig(BaseModel):
    """Where an agent's frames come from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["world", "folder", "crossing"] = "world"
    world: WorldConfig = WorldConfig(camera={"count": 0})
    """The synthetic world (``kind: world``), rendered live for this agent only."""
    crossing: CrossingConfig = CrossingConfig()
    """The pole-camera crossing (``kind: crossing``): this agent is one pole, its camera rendered live."""
    folder: Path | None = None
    """An OPV2V-layout scenario folder (``kind: folder``): played at the sensor rate."""
    preload: bool = True
    """Read the folder's frames into memory before starting, as a recording player buffers: parsing a
    frame's YAML costs tens of milliseconds of CPU that would otherwise compete with the model."""

    @model_validator(mode="after")
    def _folder_given(self) -> SourceConfig:
        if self.kind == "folder" and self.folder is None:
            raise ValueError("source kind 'folder' needs source.folder")
        return self


BOX_WIRE_BYTES = 48
"""About what one ``Box3D`` of the object list takes on the wire."""
WARM_UP_PASSES = 3
"""Untimed passes over the first frame before streaming starts."""


class ClientTlsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ca: Path | None = None
    """CA that signed the fusion node's certificate; set it to use TLS."""
    cert: Path | None = None
    key: Path | None = None
    """This agent's certificate and key, for mutual TLS."""

    def files(self) -> TlsFiles | None:
        return None if self.ca is None else TlsFiles(ca=self.ca, cert=self.cert, key=self.key)


class AgentNodeConfig(BaseModel):
    """One agent process (a launch file's ``agents:`` entry, plus what the launch shares)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    agent_id: int
    fusion: str = "127.0.0.1:50051"
    """The fusion node's ``host:port`` (gRPC)."""
    transport: Literal["grpc", "webrtc", "udp"] = "grpc"
    """``grpc``: one reliable stream (TCP). ``webrtc``: frames split into self-contained chunks on an
    unordered data channel without retransmission, so a lost chunk costs only its tiles. ``udp``: the
    same chunks in plain datagrams, no congestion control, no encryption (a trusted network or radio)."""
    webrtc: str = ""
    """The fusion node's WebRTC signalling URL, e.g. ``http://10.0.0.2:8765`` (``transport: webrtc``)."""
    udp: str = ""
    """The fusion node's datagram ``host:port``, e.g. ``10.0.0.2:8766`` (``transport: udp``)."""
    max_chunk_bytes: int = Field(1100, ge=300, le=60_000)
    """Largest chunk on the WebRTC data channel or in one datagram (well under the path MTU)."""
    rate_control: RateConfig = RateConfig()
    """Adapt bytes per frame and frame rate to the fusion node's link reports."""
    token: str = ""
    """This agent's token (empty: read from the ``CPSTREAM_TOKEN`` environment variable)."""
    tls: ClientTlsConfig = ClientTlsConfig()
    source: SourceConfig = SourceConfig()
    frames: int | None = Field(None, ge=1)
    """How many sensor frames to play (default: all the source has)."""
    rate_hz: float = Field(10.0, ge=0.0)
    """Sensor rate; 0 plays frames as fast as the model goes."""
    start_time_ns: int | None = None
    """Capture time of frame 0 on the shared sensor clock (default: the next whole second)."""
    detector: Path = Path("models/checkpoints/mobiledet_tiny.pt")
    codec: Path | None = Path("models/checkpoints/codec_mobiledet_tiny.pt")
    """``None`` sends raw features (``raw_dtype``)."""
    rate_level: int = Field(0, ge=0)
    raw_dtype: Literal["float16", "float32"] = "float16"
    score_threshold: float = Field(0.1, ge=0.0, le=1.0)
    threads: int = Field(1, ge=1)
    """torch CPU threads."""
    precision: Precision = "auto"
    """Arithmetic of the backbone and head: ``auto`` is bfloat16 where the hardware has it natively
    (the same AP to a tenth of a point on the held-out world, about a third less head time), else float32."""
    odometry: OdometryConfig = OdometryConfig()
    """LiDAR odometry sent with every frame, so the fusion node can filter this agent's pose (off by default:
    it costs about 20 ms per frame; worth it when the reported pose is noisy)."""
    pose_correction: PoseCorrectionConfig = PoseCorrectionConfig()
    """Whether (and how far) to follow the fusion node's pose corrections."""
    registration_scan: ScanConfig = ScanConfig()
    """A thinned copy of the sweep sent every few frames, which the fusion node matches onto the ego's to
    correct this agent's relative pose (off by default: about 4 KB per scan; worth it when poses are noisy)."""
    sensor: Literal["auto", "lidar", "camera"] = "auto"
    """What the features come from: ``lidar``, ``camera`` (the agent's images lifted onto the ground plane;
    the detector needs a camera path), or ``auto``: cameras for an agent that has cameras and no LiDAR
    points when the detector has a camera path, else LiDAR."""


SCAN_BUDGET_SHARE = 0.1
"""Under rate control, a registration scan may take this share of the frame budget of the frames it stands
for (it goes with one frame in ``every_frames``); the blocks beyond it (whole sectors) are left out."""


def _within(blocks: list[bytes], budget_bytes: int) -> list[bytes]:
    """The first of ``blocks`` whose bytes add up to at most ``budget_bytes``."""
    kept, used = [], 0
    for block in blocks:
        used += len(block)
        if used > budget_bytes:
            break
        kept.append(block)
    return kept


class FrameSource:
    """An agent's frames by index, rendered or read on demand."""

    def __init__(self, config: SourceConfig, agent_id: int) -> None:
        self.agent_id = agent_id
        if config.kind in ("world", "crossing"):
            self._world = SyntheticWorld(config.world) if config.kind == "world" else CrossingWorld(config.crossing)
            if agent_id not in self._world.agent_ids:
                raise DatasetError(f"agent {agent_id} is not in the {config.kind} (agents {self._world.agent_ids})")
            self.count = len(self._world)
        else:
            scenario = Scenario(config.folder, load_images=False)
            if agent_id not in scenario.agent_ids:
                raise DatasetError(f"{config.folder}: no folder for agent {agent_id} (agents {scenario.agent_ids})")
            self._folder, self._stamps = config.folder / str(agent_id), scenario.stamps
            self.count = len(scenario)
        self._loaded: dict[int, AgentFrame] = {}

    def preload(self, frames: int) -> None:
        """Read frames ``0 .. frames - 1`` of a folder source into memory (a no-op for the live world)."""
        if not hasattr(self, "_world"):
            for index in range(min(frames, self.count)):
                self._loaded[index] = self.frame(index)

    def frame(self, index: int) -> AgentFrame:
        if index in self._loaded:
            return self._loaded[index]
        if hasattr(self, "_world"):
            return self._world.agent_frame(index, self.agent_id)
        return read_agent_frame(self._folder, self._stamps[index], load_images=False)


@dataclass(slots=True)
class AgentCounters:
    frames_sensed: int = 0
    frames_skipped: int = 0
    """Sensor frames passed over because the model was still busy (latest wins)."""
    frames_rate_skipped: int = 0
    """Sensor frames not sent because rate control lowered the frame rate."""
    compute_ms: list[float] = field(default_factory=list)
    wire_bytes: list[int] = field(default_factory=list)
    rate_level: int = 0
    camera_refused: dict[str, int] = field(default_factory=dict)
    """Per camera: frames of it refused (wrong size or colour layout, a calibration that sees no ground)."""
    frames_refused: int = 0
    """Frames not sent because no camera of the agent was usable."""
    last_camera_error: str = ""


class AgentNode:
    """Runs one agent: sense, compute, code, offer to the uplink; until the frames run out or :meth:`stop`."""

    def __init__(self, config: AgentNodeConfig, detector: BevDetector, codec: FeatureCodec | None,
                 source: FrameSource) -> None:
        self.config = config
        self.detector = detector.eval()
        self.codec = codec.eval() if codec is not None else None
        self.precision = self.detector.set_precision(config.precision)
        self.device = next(detector.parameters()).device
        self.source = source
        g = detector.grid
        tile = codec.config.tile_cells * codec.config.latent_stride if codec is not None else 0
        self.grid = GridSpec(g.x_min_m, g.x_max_m, g.y_min_m, g.y_max_m, detector.feature_cell_m,
                             detector.backbone.out_channels, tile)
        if codec is not None and not 0 <= config.rate_level < codec.config.rate_levels:
            raise ValueError(f"rate_level {config.rate_level}: the codec has levels 0..{codec.config.rate_levels - 1}")
        self.counters = AgentCounters(rate_level=config.rate_level)
        self.token = config.token or os.environ.get(TOKEN_ENV, "")
        if config.transport == "webrtc":
            if not config.webrtc:
                raise ValueError("transport webrtc needs the fusion node's signalling URL in 'webrtc'")
            from transport.webrtc_link import WebRtcUplink  # aiortc is imported only where WebRTC is used
            self.uplink = WebRtcUplink(config.webrtc, config.agent_id, self.token, on_control=self._on_control,
                                       max_chunk_bytes=config.max_chunk_bytes)
        elif config.transport == "udp":
            if not config.udp:
                raise ValueError("transport udp needs the fusion node's datagram address in 'udp' (HOST:PORT)")
            from transport.datagram_link import DatagramUplink
            self.uplink = DatagramUplink(config.udp, config.agent_id, self.token, on_control=self._on_control,
                                         max_chunk_bytes=config.max_chunk_bytes)
        else:
            self.uplink = FeatureUplink(config.fusion, config.agent_id, self.token, config.tls.files(),
                                        on_control=self._on_control)
        self.rate = RateController(config.rate_control, config.rate_hz or 10.0)
        self.odometry = LidarOdometry(config.odometry) if config.odometry.enabled else None
        self.pose = (TrackedPose(config.pose_correction) if self.odometry is not None and config.pose_correction.track
                     else ReportedPose(config.pose_correction))
        self._last_boxes = np.zeros((0, 8))
        """With a tracked pose: the previous frame's detections in its ground frame (left out of the next match)."""
        if config.sensor == "camera" and detector.camera is None:
            raise ValueError(f"agent {config.agent_id}: sensor camera but {config.detector} has no camera path "
                             "(its camera_backbone is not set)")
        self._image_size: dict[str, tuple[int, int]] = {}
        """Per camera, the (height, width) of its first good frame: what its calibration is for."""
        self._stop = asyncio.Event()
        self._link: asyncio.Task | None = None
        # One thread computes every frame: the warm-up's passes then leave that thread's torch and
        # malloc arena warm (a fresh thread's first frames took 100-230 ms beside the other agents).
        self._compute_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"agent{config.agent_id}")

    def _on_control(self, control: Control) -> None:
        if control.HasField("link") and self.config.rate_control.enabled:
            self.rate.update(control.link)
        if control.HasField("target_rate_level") and self.codec is not None:
            level = min(max(control.target_rate_level, 0), self.codec.config.rate_levels - 1)
            if level != self.counters.rate_level:
                log.info("agent %d: fusion asks for rate level %d", self.config.agent_id, level)
            self.counters.rate_level = level
        if control.HasField("pose_correction"):
            try:
                if isinstance(self.pose, TrackedPose):
                    covariance = (pose_to_planar_covariance(np.reshape(control.pose_correction.covariance, (6, 6)))
                                  if len(control.pose_correction.covariance) == 36 else None)
                    self.pose.on_correction(control.pose_correction_sequence, pose_from_proto(control.pose_correction),
                                            covariance)
                else:
                    self.pose.on_correction(control.pose_correction_sequence, pose_from_proto(control.pose_correction))
            except (CorrectionRefused, FramingError) as err:
                log.warning("agent %d: pose correction not applied: %s", self.config.agent_id, err)

    def stop(self) -> None:
        self._stop.set()

    def start_link(self) -> asyncio.Task:
        """Open the uplink now (e.g. while waiting for the start), so the first frames do not wait for it."""
        if self._link is None:
            self._link = asyncio.create_task(self.uplink.run())
        return self._link

    async def connect(self, timeout_s: float = 30.0) -> None:
        """Open the uplink and wait until the fusion node has accepted the stream.

        Raises:
            LinkError: the fusion node refused this agent (wrong token, unknown agent).
            TimeoutError: no fusion node answered within ``timeout_s``.
        """
        link = self.start_link()
        connected = asyncio.ensure_future(self.uplink.connected.wait())
        await asyncio.wait([connected, link], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if link.done():
            connected.cancel()
            link.result()  # raises the refusal
        if not connected.done():
            connected.cancel()
            raise TimeoutError(f"agent {self.config.agent_id}: no fusion node at {self.config.fusion} "
                               f"within {timeout_s:.0f} s")

    def warm_up(self) -> None:
        """Buffer a folder source (when asked) and run the first frame untimed, in the thread that will
        compute every frame (torch's first passes, and a fresh thread's first allocations, are slow)."""
        if self.config.source.preload:
            self.source.preload(self.config.frames or self.source.count)
        for _ in range(WARM_UP_PASSES):
            self._compute_thread.submit(self.compute, 0, time.time_ns()).result()

    def uses_cameras(self, agent: AgentFrame) -> bool:
        if self.config.sensor != "auto":
            return self.config.sensor == "camera"
        return self.detector.camera is not None and bool(agent.cameras) and not len(agent.points)

    def camera_features(self, agent: AgentFrame, bev_from_ground: np.ndarray) -> torch.Tensor | None:
        """``[1, C, h, w]`` the agent's usable camera images lifted onto its BEV grid, or ``None`` when no
        camera is usable. A camera whose frame or calibration is refused is counted and left out."""
        ground_from_lidar = np.eye(4)
        ground_from_lidar[2, 3] = agent.world_from_lidar[2, 3]  # the ground frame sits under the sensor frame
        groups: dict[tuple[int, int], tuple[list[np.ndarray], list[GroundSampling]]] = {}
        for camera in agent.cameras:
            name = f"{self.config.agent_id}/{camera.name}"
            try:
                if camera.image_rgb is None:
                    raise CameraInputError(f"camera {name!r}: no image")
                size = self._image_size.get(camera.name)
                image = check_image(name, camera.image_rgb, *(size or np.shape(camera.image_rgb)[:2]))
                size = image.shape[:2]
                sampling = self.detector.camera_sampling(name, camera.intrinsic,
                                                         bev_from_ground @ ground_from_lidar @ camera.lidar_from_camera,
                                                         *size)
            except CameraInputError as err:
                self.counters.camera_refused[camera.name] = self.counters.camera_refused.get(camera.name, 0) + 1
                self.counters.last_camera_error = str(err)
                log.warning("agent %d: frame of %s", self.config.agent_id, err)
                continue
            self._image_size.setdefault(camera.name, size)
            images, samplings = groups.setdefault(size, ([], []))
            images.append(image)
            samplings.append(sampling)
        if not groups:
            return None
        lifted, seen = [], []
        for images, samplings in groups.values():  # cameras of one size go through the backbone together
            x = torch.from_numpy(np.stack(images)).to(self.device)
            features, count = self.detector.lift_cameras(x, samplings)
            lifted.append(features * count)
            seen.append(count)
        return (sum(lifted) / sum(seen).clamp(min=1.0))[None]

    @torch.no_grad()
    def compute(self, index: int, capture_time_ns: int) -> FeatureFrame | None:
        """Sense frame ``index`` and build its message (runs in a worker thread); ``None`` when the frame
        has nothing usable (every camera refused, counted)."""
        torch.set_num_threads(self.config.threads)
        agent = self.source.frame(index)
        own, tracked = agent, None
        if isinstance(self.pose, TrackedPose):
            tracked = self._track(index, agent)
            corrected, sigma, correction = tracked[1]
            agent = dataclasses.replace(agent, world_from_lidar=corrected,
                                        pose_covariance=planar_to_pose_covariance(sigma_covariance(sigma)))
        else:
            corrected, correction = self.pose.report(index, agent.world_from_lidar)
            agent = dataclasses.replace(agent, world_from_lidar=corrected)
        world_from_bev, bev_from_ground, points = bev_input(agent, self.detector.feature_cell_m)
        if self.uses_cameras(agent):
            features = self.camera_features(agent, bev_from_ground)
            if features is None:
                self.counters.frames_refused += 1
                return None
        else:
            features = self.detector.features([torch.from_numpy(points).to(self.device)])
        out = self.detector.infer(features)
        detections = self.detector.decode(out, score_threshold=self.config.score_threshold)[0].cpu().numpy()
        if tracked is None:
            self.pose.remember_frame(index, world_from_bev)
            motion = self._odometry(agent, bev_from_ground, detections)
        else:
            self.pose.remember_frame(index, world_from_bev, corrected)
            self._last_boxes = transform_boxes(invert_se3(bev_from_ground), detections[:, :8])
            motion = self._tracked_extras(tracked[0], own, corrected, world_from_bev, bev_from_ground)
        common = {"agent_id": self.config.agent_id, "sequence": index, "capture_time_ns": capture_time_ns,
                  "world_from_agent": world_from_bev, "grid": self.grid, "detections": detections[:, :9],
                  "pose_covariance": agent.pose_covariance, "pose_correction_sequence": correction,
                  "scan_blocks": self._scan(index, points, None if tracked is None else tracked[1][1].xy_m),
                  **motion}
        if self.codec is None:
            dtype = np.float16 if self.config.raw_dtype == "float16" else np.float32
            payload = features[0].cpu().numpy().astype(dtype).tobytes()
            return feature_frame(codec_id=RAW_CODEC_ID, rate_level=0, tiles=[CodedTile(0, payload, zlib.crc32(payload))],
                                 tile_count=1, feature_dtype=FeatureDtype.FEATURE_DTYPE_FLOAT16 if dtype == np.float16
                                 else FeatureDtype.FEATURE_DTYPE_FLOAT32, **common)
        relevance = self.detector.relevance(out)[0]
        if self.config.rate_control.enabled:  # the link's budget: the highest level that fits, tiles cut by relevance
            budget = self.rate.frame_budget_bytes
            keep = max(0, int(0.15 * budget) // BOX_WIRE_BYTES)
            common["detections"] = detections[np.argsort(-detections[:, 7], kind="stable")[:keep], :9]
            common["scan_blocks"] = _within(common["scan_blocks"], int(SCAN_BUDGET_SHARE * budget
                                                                      * self.config.registration_scan.every_frames))
            coded = self.codec.encode_within(features, max(0, int(0.75 * budget)), relevance=relevance)
            self.counters.rate_level = coded.level
        else:
            coded = self.codec.encode(features, self.counters.rate_level, relevance=relevance)
        return feature_frame(codec_id=self.codec.codec_id, rate_level=coded.level, tiles=coded.tiles,
                             tile_count=self.codec.tile_count(coded.feature_shape), **common)

    def _scan(self, index: int, points_bev: np.ndarray, sigma_xy_m: float | None = None) -> list[bytes]:
        """This frame's registration scan (BEV frame, packed), on the frames :func:`models.scan.scan_due` names
        (``sigma_xy_m``: a tracked pose's uncertainty). Frames are numbered on the shared sensor clock, so the
        agents' turns do not drift apart."""
        config = self.config.registration_scan
        if not scan_due(config, self.config.agent_id, index, sigma_xy_m):
            return []
        return pack_scan(thin_scan(points_bev, config), config)

    def _odometry(self, agent: AgentFrame, bev_from_ground: np.ndarray, detections: np.ndarray) -> dict:
        """``odom_from_agent`` (the BEV frame in the odometry frame) and its step covariance, if enabled;
        ``detections`` (BEV frame) are the vehicles the match leaves out."""
        if self.odometry is None:
            return {}
        ground_from_bev = invert_se3(bev_from_ground)
        step = self.odometry.step(ground_points(agent), transform_boxes(ground_from_bev, detections[:, :8]))
        return _odometry_fields(step, ground_from_bev)

    def _track(self, index: int, agent: AgentFrame) -> tuple:
        """With a tracked pose: this sweep's odometry (the previous frame's vehicles, moved on by the last motion,
        left out of the match: this frame's are found in the BEV frame the pose decides) and the pose to report."""
        boxes = transform_boxes(invert_se3(self.odometry.last_motion), self._last_boxes)
        step = self.odometry.step(ground_points(agent), boxes)
        own_sigma = (pose_covariance_sigma(agent.pose_covariance) if agent.pose_covariance is not None
                     else PlanarSigma(self.config.pose_correction.own_sigma_xy_m,
                                      float(np.deg2rad(self.config.pose_correction.own_sigma_yaw_deg))))
        report = self.pose.report(index, agent.world_from_lidar, own_sigma, step.odom_from_ground,
                                  PlanarSigma(step.sigma_xy_m, step.sigma_yaw_rad))
        return step, report

    @staticmethod
    def _tracked_extras(step: OdometryStep, own: AgentFrame, corrected: np.ndarray, world_from_bev: np.ndarray,
                        bev_from_ground: np.ndarray) -> dict:
        """The odometry fields, and where the agent's own fix alone puts the BEV frame (``own_pose``)."""
        own_pose = orthonormal(own.world_from_lidar @ invert_se3(corrected) @ world_from_bev)
        return {**_odometry_fields(step, invert_se3(bev_from_ground)), "own_pose": own_pose,
                "own_pose_covariance": own.pose_covariance}

    async def run(self) -> AgentCounters:
        """Play the source; returns the counters. Raises ``LinkError`` if the fusion node refuses us."""
        frames = min(self.config.frames or self.source.count, self.source.count)
        period_ns = int(1e9 / self.config.rate_hz) if self.config.rate_hz > 0 else 0
        start_ns = self.config.start_time_ns
        if start_ns is None:
            start_ns = (time.time_ns() // 1_000_000_000 + 1) * 1_000_000_000
        link = self.start_link()
        index = 0
        last_sent_ns = None
        try:
            while index < frames and not self._stop.is_set():
                if link.done():
                    link.result()  # raises the link's error
                    break
                capture_ns = start_ns + index * period_ns if period_ns else time.time_ns()
                if (period_ns and self.config.rate_control.enabled and last_sent_ns is not None
                        and capture_ns - last_sent_ns < 1e9 / self.rate.frame_rate_hz - period_ns / 2):
                    index += 1  # the link pays for fewer frames: this one is not sensed or sent
                    self.counters.frames_rate_skipped += 1
                    continue
                wait_s = (capture_ns - time.time_ns()) / 1e9
                if wait_s > 0:  # the sensor clock: frame `index` exists from its capture time on
                    try:
                        await asyncio.wait_for(self._stop.wait(), timeout=wait_s)
                        break
                    except TimeoutError:
                        pass
                began = time.perf_counter()
                message = await asyncio.get_running_loop().run_in_executor(self._compute_thread, self.compute,
                                                                           index, capture_ns)
                self.counters.compute_ms.append((time.perf_counter() - began) * 1e3)
                self.counters.frames_sensed += 1
                if message is not None:
                    self.counters.wire_bytes.append(message.ByteSize())
                    self.uplink.offer(message)
                    last_sent_ns = capture_ns
                index += 1
                if period_ns:  # fell behind the sensor: jump to the newest frame, do not queue
                    newest = (time.time_ns() - start_ns) // period_ns
                    if newest > index:
                        self.counters.frames_skipped += min(newest, frames) - index
                        index = newest
        finally:
            self.uplink.close()
            try:
                await asyncio.wait_for(asyncio.shield(link), timeout=5.0)
            except TimeoutError:
                link.cancel()
                await asyncio.gather(link, return_exceptions=True)
            self._compute_thread.shutdown(wait=False)
        return self.counters

    def report(self) -> dict:
        c, u = self.counters, self.uplink.counters
        rate = {"enabled": self.config.rate_control.enabled, "reports": self.rate.reports,
                "congested_reports": self.rate.congested_reports, "target_bps": round(self.rate.target_bps),
                "frame_rate_hz": round(self.rate.frame_rate_hz, 2)}
        return {"agent_id": self.config.agent_id, "transport": self.config.transport, "rate_control": rate,
                "frames_sensed": c.frames_sensed, "frames_skipped": c.frames_skipped,
                "frames_rate_skipped": c.frames_rate_skipped, "frames_refused": c.frames_refused,
                "camera_refused": dict(c.camera_refused), "last_camera_error": c.last_camera_error,
                "precision": self.precision, "compute_ms": _percentiles(c.compute_ms),
                "bytes_per_frame": float(np.mean(c.wire_bytes)) if c.wire_bytes else 0.0, "rate_level": c.rate_level,
                "pose_corrections": {"applied": self.pose.applied, "refused": self.pose.refused,
                                     "carried": self.pose.sequence, "last_error": self.pose.last_error},
                "uplink": dataclasses.asdict(u)}


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    return {"p50": round(float(np.percentile(values, 50)), 2), "p99": round(float(np.percentile(values, 99)), 2)}


def load_agent_node(config: AgentNodeConfig, root: Path = Path(".")) -> AgentNode:
    """Build the node from checkpoints (relative paths from ``root``); CUDA when present."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(config.threads)
    detector, _ = load_checkpoint(config.detector if config.detector.is_absolute() else root / config.detector,
                                  map_location=device)
    codec = None
    if config.codec is not None:
        codec, _ = load_codec(config.codec if config.codec.is_absolute() else root / config.codec, detector.config,
                              map_location=device)
        codec = codec.to(device)
    return AgentNode(config, detector.to(device), codec, FrameSource(config.source, config.agent_id))


def write_report(path: Path | None, report: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))


__all__ = [
    "TOKEN_ENV",
    "AgentNode",
    "AgentNodeConfig",
    "ClientTlsConfig",
    "FrameSource",
    "LinkError",
    "SourceConfig",
    "bev_input",
    "ground_points",
    "ground_pose",
    "load_agent_node",
    "write_report",
]
