"""Checking and decoding one received ``FeatureFrame`` into features the fusion node can warp.

Every check names what is wrong; a refused frame raises :class:`FrameRefused` and
nothing of it is kept (the caller counts it), other frames and agents go on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from fusion.alignment import PlanarSigma
from fusion.calibration import (CalibrationError, calibration_from_proto, check_rigid, planar_sigma,
                                pose_estimate_from_proto)
from models.codec import CodedFrame, CodedTile, FeatureCodec
from models.detector import BevDetector
from models.scan import ScanError, unpack_scan
from protos import FeatureDtype, FeatureFrame
from transport import RAW_CODEC_ID, FramingError, GridSpec, boxes_from_proto, grid_from_proto, pose_from_proto


class FrameRefused(ValueError):
    """A frame the fusion node will not use; the message says why."""


@dataclass(frozen=True, slots=True)
class Contribution:
    """One agent-frame, decoded and ready to warp."""

    agent_id: int
    sequence: int
    capture_time_ns: int
    receive_time_ns: int
    world_from_agent: np.ndarray  # [4, 4] the agent's BEV frame in the world
    features: torch.Tensor  # [1, C, h, w]
    valid: torch.Tensor  # [1, 1, h, w] 1 where tiles arrived
    detections: np.ndarray  # [K, 9] the agent's own boxes, its frame
    payload_bytes: int
    wire_bytes: int
    tiles: int
    tiles_refused: int
    decode_ms: float
    message: FeatureFrame | None = None
    """The frame as received (forwarded to subscribers that record)."""
    pose_sigma: PlanarSigma | None = None
    """The reported pose's planar uncertainty (None: the frame states none)."""
    odom_from_agent: np.ndarray | None = None  # [4, 4] the agent's dead-reckoned pose, if sent
    odometry_sigma: PlanarSigma | None = None
    """Uncertainty of the agent's motion since its previous frame."""
    pose_correction_sequence: int = 0
    set_aside: tuple[str, ...] = ()
    """Parts of the frame that failed their checks and were left out (the frame itself is used), each
    ``"<part>: <what is wrong>"`` with part ``pose covariance``, ``odometry``, ``own pose``, ``calibration`` or ``scan``."""
    scan: np.ndarray | None = None
    """``[M, 3]`` the registration scan this frame carried (agent frame), or None."""
    own_pose: np.ndarray | None = None
    """``[4, 4]`` where the agent's own GNSS/INS alone puts this frame, when ``world_from_agent`` carries the
    node's estimates (``FeatureFrame.own_pose``), or None."""
    own_pose_sigma: PlanarSigma | None = None


def expected_grid(detector: BevDetector, codec: FeatureCodec | None) -> GridSpec:
    """The feature grid this node's detector fuses (and the codec's tile size)."""
    g = detector.grid
    tile = codec.config.tile_cells * codec.config.latent_stride if codec is not None else 0
    return GridSpec(g.x_min_m, g.x_max_m, g.y_min_m, g.y_max_m, detector.feature_cell_m,
                    detector.backbone.out_channels, tile)


def check_pose(world_from_agent: np.ndarray) -> None:
    """Refuses a pose that is not a finite rigid transform (see :func:`fusion.calibration.check_rigid`)."""
    try:
        check_rigid(world_from_agent, "pose")
    except CalibrationError as err:
        raise FrameRefused(str(err)) from None


def check_frame(frame: FeatureFrame, *, codec: FeatureCodec | None, grid: GridSpec,
                max_payload_bytes: int) -> np.ndarray:
    """The checks a frame (or one chunk of it) must pass before it is kept; returns its pose.

    Raises:
        FrameRefused: wrong grid, foreign codec id, bad rate level or tile count, oversized
            payload, a bad pose or capture time (the message says which).
    """
    try:
        their_grid = grid_from_proto(frame.grid)
        world_from_agent = pose_from_proto(frame.pose)
    except FramingError as err:
        raise FrameRefused(str(err)) from err
    difference = grid.mismatch(their_grid, tiles=frame.codec_id != RAW_CODEC_ID)
    if difference is not None:
        raise FrameRefused(f"feature grid differs from this node's: {difference}")
    check_pose(world_from_agent)
    if frame.capture_time_ns <= 0:
        raise FrameRefused(f"capture time {frame.capture_time_ns} ns is not a time")
    payload = sum(len(t.payload) for t in frame.tiles)
    if payload > max_payload_bytes:
        raise FrameRefused(f"payload of {payload} bytes exceeds the limit of {max_payload_bytes}")
    if codec is not None and frame.codec_id == codec.codec_id:
        if not 0 <= frame.rate_level < codec.config.rate_levels:
            raise FrameRefused(f"rate level {frame.rate_level} outside 0..{codec.config.rate_levels - 1}")
        shape = (grid.channels, grid.height_cells, grid.width_cells)
        if frame.tile_count != codec.tile_count(shape):
            raise FrameRefused(f"tile count {frame.tile_count} != {codec.tile_count(shape)} of this codec")
    elif frame.codec_id != RAW_CODEC_ID:
        known = [RAW_CODEC_ID] + ([codec.codec_id] if codec is not None else [])
        raise FrameRefused(f"unknown codec id {frame.codec_id!r} (this node decodes {', '.join(known)})")
    return world_from_agent


def decode_frame(frame: FeatureFrame, *, detector: BevDetector, codec: FeatureCodec | None, grid: GridSpec,
                 receive_time_ns: int, max_payload_bytes: int, device: torch.device) -> Contribution:
    """Check ``frame`` against this node's grid and codec and decode its features.

    Raises:
        FrameRefused: what :func:`check_frame` refuses, non-finite values, or no decodable tile.
    """
    t0 = time.perf_counter()
    world_from_agent = check_frame(frame, codec=codec, grid=grid, max_payload_bytes=max_payload_bytes)
    payload = sum(len(t.payload) for t in frame.tiles)
    shape = (grid.channels, grid.height_cells, grid.width_cells)
    refused = 0
    if frame.codec_id == RAW_CODEC_ID:
        features, valid = _raw_features(frame, shape, device)
    else:
        tiles = tuple(CodedTile(t.index, t.payload, t.crc32, t.relevance) for t in frame.tiles)
        features, valid, report = codec.decode(CodedFrame(frame.rate_level, shape, tiles), device=device)
        refused = len(report.refused)
        if not report.decoded and frame.tiles:
            raise FrameRefused(f"no tile decoded: {report.refused[0][1]}")
    try:
        detections = boxes_from_proto(frame.detections)
    except (TypeError, ValueError) as err:
        raise FrameRefused(f"object list: {err}") from err
    if not np.all(np.isfinite(detections)):
        raise FrameRefused("object list has non-finite values")
    pose_sigma, odometry, odometry_sigma, own_pose, own_sigma, set_aside = _pose_extras(frame)
    scan = None
    if frame.scan_blocks:
        try:
            scan = unpack_scan(list(frame.scan_blocks))
        except ScanError as err:
            set_aside = (*set_aside, f"scan: {err}")
    return Contribution(frame.agent_id, frame.sequence, frame.capture_time_ns, receive_time_ns, world_from_agent,
                        features, valid, detections, payload, frame.ByteSize(), len(frame.tiles), refused,
                        (time.perf_counter() - t0) * 1e3, frame, pose_sigma, odometry, odometry_sigma,
                        frame.pose_correction_sequence, set_aside, scan, own_pose, own_sigma)


def _sigma(covariance: np.ndarray | None) -> PlanarSigma | None:
    return None if covariance is None else PlanarSigma(*planar_sigma(covariance))


def _pose_extras(frame: FeatureFrame) -> tuple:
    """The pose's uncertainty, the odometry (and its step's uncertainty), the agent's own fix (and its
    uncertainty) and the calibration, each checked; a part that fails is set aside (named in the last
    item) and the frame is used without it."""
    set_aside = []
    pose_sigma = odometry = odometry_sigma = own_pose = own_sigma = None
    try:
        pose_sigma = _sigma(pose_estimate_from_proto(frame.pose, "pose covariance").covariance)
    except CalibrationError as err:
        set_aside.append(str(err))
    if frame.HasField("odometry"):
        odometry, odometry_sigma = _optional_pose(frame.odometry, "odometry", set_aside)
    if frame.HasField("own_pose"):
        own_pose, own_sigma = _optional_pose(frame.own_pose, "own pose", set_aside)
    if frame.HasField("calibration"):
        try:
            calibration_from_proto(frame.calibration, "calibration")
        except CalibrationError as err:
            set_aside.append(str(err))
    return pose_sigma, odometry, odometry_sigma, own_pose, own_sigma, tuple(set_aside)


def _optional_pose(pose, what: str, set_aside: list[str]) -> tuple[np.ndarray | None, PlanarSigma | None]:
    """A pose beside the frame's own and its planar uncertainty, or (None, None) with the reason set aside."""
    try:
        estimate = pose_estimate_from_proto(pose, what)
    except CalibrationError as err:
        set_aside.append(str(err))
        return None, None
    return np.array(estimate.world_from_agent), _sigma(estimate.covariance)


def _raw_features(frame: FeatureFrame, shape: tuple[int, int, int], device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    dtypes = {FeatureDtype.FEATURE_DTYPE_FLOAT32: np.float32, FeatureDtype.FEATURE_DTYPE_FLOAT16: np.float16}
    if frame.feature_dtype not in dtypes:
        raise FrameRefused(f"raw features need dtype float32 or float16, not "
                           f"{FeatureDtype.Name(frame.feature_dtype) if frame.feature_dtype in FeatureDtype.values() else frame.feature_dtype}")
    if len(frame.tiles) != 1:
        raise FrameRefused(f"raw features come as one tile, got {len(frame.tiles)}")
    dtype = dtypes[frame.feature_dtype]
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if len(frame.tiles[0].payload) != expected:
        raise FrameRefused(f"raw payload of {len(frame.tiles[0].payload)} bytes does not hold a {shape} "
                           f"{np.dtype(dtype).name} map ({expected} bytes)")
    array = np.frombuffer(frame.tiles[0].payload, dtype).reshape(shape).astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise FrameRefused(f"raw features hold {int((~np.isfinite(array)).sum())} non-finite values")
    features = torch.from_numpy(array)[None].to(device)
    return features, torch.ones((1, 1, *shape[1:]), device=device)
