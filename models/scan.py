"""Registration scans: a thinned copy of an agent's LiDAR sweep, small enough to send, for placing it exactly.

Two agents' object lists agree only to about half a metre (they see each object from different
sides), which is too coarse for IoU 0.7. The static structure both see - building walls, kerbs,
parked and passing vehicles at the same instant - pins their relative pose to centimetres when
the sweeps themselves are matched (ICP). An agent therefore sends, every few frames, its sweep
above the ground (the ground fixes no horizontal motion) thinned to one point per voxel, in its
own BEV frame, packed in blocks that each decode alone: a lost block loses its points, not the scan.

Packing: per block a 16-byte header (magic ``b"RS"``, version, point count, x/y resolution in
millimetres, z resolution in centimetres, a CRC-32 of the body), then the zlib-compressed body: the
points sorted by x, x as int16 deltas, y as int16 and z as uint8 in those resolutions (2 cm and
10 cm: walls are sampled at a voxel of about a metre, so that quantisation costs nothing). Bad bytes
raise :class:`ScanError` naming what is wrong.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

_MAGIC = b"RS"
_VERSION = 1
_HEADER = struct.Struct("<2sBxHHHxxI")  # magic, version, pad, count, xy mm, z cm, pad, crc32 of the body -> 16 bytes
MAX_BLOCK_POINTS = 4096
"""A block holding more points than this is refused (no block the packer writes comes close)."""
MAX_BLOCKS = 64
"""A scan in more blocks than this is refused (a default scan takes 5-10)."""


class ScanError(ValueError):
    """Bytes that are not a registration-scan block (the message says what is wrong)."""


class ScanConfig(BaseModel):
    """What an agent sends for registration (an agent's ``registration_scan`` section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    """Off by default, like odometry: worth its bytes (about 4 KB per scan) where reported poses are noisy."""
    every_frames: int = Field(5, ge=1)
    """A scan goes with one frame in this many (odometry carries the pose between them): those whose index
    is the agent's id modulo it, so that agents take turns and the fusion node matches about one scan per
    frame rather than every agent's at once. The ego's agent, beside the fusion node on a local link,
    sends one with every frame (``every_frames: 1``) so that each scan finds one to be matched onto."""
    uncertain_sigma_m: float = Field(0.15, ge=0.0)
    """An agent that tracks its pose (:class:`agents.pose.TrackedPose`) sends a scan with every frame while its
    position is less certain than this (standard deviation; 0: never): until the fusion node's first estimates
    come back, or when they stop coming, a scan is what fixes it to centimetres."""
    voxel_m: float = Field(1.0, gt=0.0)
    """One point per voxel of this edge."""
    min_height_m: float = Field(0.3, ge=0.0)
    """Points lower than this above the ground are left out."""
    max_height_m: float = Field(20.0, gt=0.0)
    """Points higher than this are left out (the packing holds heights up to 25.5 m)."""
    max_range_m: float = Field(60.0, gt=0.0)
    """Points farther than this from the agent are left out (sparse, and the farthest wrongly matched)."""
    block_points: int = Field(240, ge=16, le=MAX_BLOCK_POINTS)
    """Points per block: one block fits a transport chunk of about a kilobyte."""
    xy_resolution_m: float = Field(0.02, gt=0.0)
    z_resolution_m: float = Field(0.1, gt=0.0)


def scan_due(config: ScanConfig, agent_id: int, index: int, sigma_xy_m: float | None = None) -> bool:
    """Whether frame ``index`` of agent ``agent_id`` carries a scan (see :attr:`ScanConfig.every_frames`; with the
    agent's tracked position uncertainty ``sigma_xy_m``, also :attr:`ScanConfig.uncertain_sigma_m`)."""
    uncertain = sigma_xy_m is not None and 0.0 < config.uncertain_sigma_m < sigma_xy_m
    return config.enabled and (uncertain or index % config.every_frames == agent_id % config.every_frames)


def thin_scan(points: np.ndarray, config: ScanConfig) -> np.ndarray:
    """``[N, >=3]`` points (agent frame, z above the ground) -> ``[M, 3]`` float32, one per occupied voxel
    (the first of the voxel's points in the input's order), in the configured height band and range."""
    xyz = np.asarray(points)[:, :3].reshape(-1, 3)
    keep = ((xyz[:, 2] >= config.min_height_m) & (xyz[:, 2] <= config.max_height_m)
            & (xyz[:, 0] ** 2 + xyz[:, 1] ** 2 <= config.max_range_m ** 2))
    xyz = xyz[keep].astype(np.float64)
    if len(xyz) == 0:
        return np.zeros((0, 3), dtype=np.float32)
    voxel = np.floor(xyz / config.voxel_m).astype(np.int64)
    voxel -= voxel.min(axis=0)
    span = voxel.max(axis=0) + 1
    key = (voxel[:, 0] * span[1] + voxel[:, 1]) * span[2] + voxel[:, 2]  # one integer per voxel
    _, first = np.unique(key, return_index=True)
    return xyz[np.sort(first)].astype(np.float32)


def pack_scan(points: np.ndarray, config: ScanConfig) -> list[bytes]:
    """``[M, 3]`` points (agent frame) -> blocks of at most ``config.block_points`` that each decode alone.

    Points outside what the packing holds (|x|, |y| beyond the int16 range at the x/y resolution,
    z outside [0, 25.5 m]) are left out.
    """
    xyz = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    xy_mm, z_cm = int(round(config.xy_resolution_m * 1000)), int(round(config.z_resolution_m * 100))
    if not 1 <= xy_mm <= 65535 or not 1 <= z_cm <= 65535:
        raise ScanError(f"resolutions {config.xy_resolution_m} m / {config.z_resolution_m} m cannot be packed")
    q = np.round(xyz / np.array([xy_mm / 1000, xy_mm / 1000, z_cm / 100])).astype(np.int64)
    fits = (np.abs(q[:, :2]) <= 32767).all(axis=1) & (q[:, 2] >= 0) & (q[:, 2] <= 255)
    q = q[fits]
    blocks = []
    # Blocks by angle about the agent, so a lost block loses one sector rather than points everywhere.
    q = q[np.argsort(np.arctan2(q[:, 1], q[:, 0]), kind="stable")]
    for start in range(0, len(q), config.block_points):
        part = q[start:start + config.block_points]
        part = part[np.argsort(part[:, 0], kind="stable")]
        dx = np.diff(part[:, 0], prepend=0)
        if np.abs(dx).max(initial=0) > 32767:  # a jump from 0 to the first x fits by the check above
            raise ScanError("x step does not fit the packing")
        body = zlib.compress(dx.astype("<i2").tobytes() + part[:, 1].astype("<i2").tobytes()
                             + part[:, 2].astype(np.uint8).tobytes(), 6)
        blocks.append(_HEADER.pack(_MAGIC, _VERSION, len(part), xy_mm, z_cm, zlib.crc32(body)) + body)
    return blocks


def unpack_scan(blocks: list[bytes]) -> np.ndarray:
    """Blocks from :func:`pack_scan` -> ``[M, 3]`` float32 points (agent frame). Raises :class:`ScanError`
    naming the block and what is wrong."""
    if len(blocks) > MAX_BLOCKS:
        raise ScanError(f"scan in {len(blocks)} blocks, more than {MAX_BLOCKS}")
    parts = [np.zeros((0, 3), dtype=np.float32)]
    for index, block in enumerate(blocks):
        if len(block) < _HEADER.size:
            raise ScanError(f"scan block {index} is {len(block)} bytes, shorter than its header")
        magic, version, count, xy_mm, z_cm, crc = _HEADER.unpack_from(block)
        if magic != _MAGIC or version != _VERSION:
            raise ScanError(f"scan block {index} is not a version-{_VERSION} registration scan")
        if count > MAX_BLOCK_POINTS or xy_mm == 0 or z_cm == 0:
            raise ScanError(f"scan block {index} header is out of range ({count} points, {xy_mm} mm, {z_cm} cm)")
        body = block[_HEADER.size:]
        if zlib.crc32(body) != crc:
            raise ScanError(f"scan block {index} fails its CRC-32")
        try:
            raw = zlib.decompress(body)
        except zlib.error as err:
            raise ScanError(f"scan block {index} does not decompress: {err}") from None
        if len(raw) != 5 * count:
            raise ScanError(f"scan block {index} holds {len(raw)} bytes for {count} points (expected {5 * count})")
        x = np.cumsum(np.frombuffer(raw, "<i2", count, 0).astype(np.int64))
        y = np.frombuffer(raw, "<i2", count, 2 * count).astype(np.int64)
        z = np.frombuffer(raw, np.uint8, count, 4 * count).astype(np.int64)
        parts.append((np.stack([x * xy_mm / 1000, y * xy_mm / 1000, z * z_cm / 100], axis=1)).astype(np.float32))
    return np.concatenate(parts)
