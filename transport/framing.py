"""Framing: plain arrays and tiles <-> ``cp.v1.FeatureFrame`` messages.

Everything that builds or reads a ``FeatureFrame`` goes through here, so the
agent and fusion sides agree on every field by construction. Tiles are
anything with ``index``, ``payload``, ``crc32`` and ``relevance`` attributes
(e.g. ``models.codec.CodedTile``); boxes are ``[K, 9]`` arrays of
``x, y, z, l, w, h, yaw, score, label``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from protos import BevGridSpec, Box3D, FeatureDtype, FeatureFrame, ObjectClass, Pose

RAW_CODEC_ID = "raw"
"""Codec id of uncompressed features: one tile holding the ``[C, h, w]`` map in ``feature_dtype``."""
LABEL_TO_CLASS = {0: ObjectClass.OBJECT_CLASS_VEHICLE, 1: ObjectClass.OBJECT_CLASS_PEDESTRIAN}
"""Detector class index -> wire class."""
CLASS_TO_LABEL = {v: k for k, v in LABEL_TO_CLASS.items()}


class FramingError(ValueError):
    """A message that cannot be turned back into arrays (the message names the field)."""


class ChunkCounters(Protocol):
    """What :class:`LatestChunks` counts, on a chunked uplink's counters."""

    offered: int
    sent: int
    dropped_stale: int
    chunks_sent: int
    chunks_dropped_stale: int


class TileLike(Protocol):
    index: int
    payload: bytes
    crc32: int
    relevance: float


@dataclass(frozen=True, slots=True)
class GridSpec:
    """The feature grid a frame's tiles belong to (see ``cp.v1.BevGridSpec``)."""

    x_min_m: float
    x_max_m: float
    y_min_m: float
    y_max_m: float
    cell_size_m: float
    channels: int
    tile_size_cells: int

    @property
    def height_cells(self) -> int:
        return round((self.y_max_m - self.y_min_m) / self.cell_size_m)

    @property
    def width_cells(self) -> int:
        return round((self.x_max_m - self.x_min_m) / self.cell_size_m)

    def mismatch(self, other: GridSpec, tolerance_m: float = 1e-4, tiles: bool = True) -> str | None:
        """``None`` when ``other`` is the same grid (to float32 precision), else what differs.

        ``tiles=False`` ignores the tile size (uncoded features come as one tile).
        """
        diffs = [f"{name} {getattr(other, name)} != {getattr(self, name)}"
                 for name in ("x_min_m", "x_max_m", "y_min_m", "y_max_m", "cell_size_m")
                 if abs(getattr(other, name) - getattr(self, name)) > tolerance_m]
        diffs += [f"{name} {getattr(other, name)} != {getattr(self, name)}"
                  for name in ("channels", "tile_size_cells")[:2 if tiles else 1]
                  if getattr(other, name) != getattr(self, name)]
        return "; ".join(diffs) or None

    def to_proto(self) -> BevGridSpec:
        return BevGridSpec(x_min_m=self.x_min_m, x_max_m=self.x_max_m, y_min_m=self.y_min_m, y_max_m=self.y_max_m,
                           cell_size_m=self.cell_size_m, channels=self.channels, height_cells=self.height_cells,
                           width_cells=self.width_cells, tile_size_cells=self.tile_size_cells)


def pose_to_proto(world_from_agent: np.ndarray, covariance: np.ndarray | None = None) -> Pose:
    """A rigid ``[4, 4]`` transform as ``Pose`` (R = Rz(yaw) Ry(pitch) Rx(roll)), with its ``[6, 6]``
    covariance of (x, y, z, roll, pitch, yaw) when given."""
    m = np.asarray(world_from_agent, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise FramingError(f"pose must be a finite 4x4 matrix, got shape {m.shape}")
    pitch = math.asin(max(-1.0, min(1.0, -m[2, 0])))
    return Pose(x_m=m[0, 3], y_m=m[1, 3], z_m=m[2, 3], roll_rad=math.atan2(m[2, 1], m[2, 2]), pitch_rad=pitch,
                yaw_rad=math.atan2(m[1, 0], m[0, 0]),
                covariance=[] if covariance is None else np.asarray(covariance, dtype=np.float64).ravel().tolist())


def pose_from_proto(pose: Pose) -> np.ndarray:
    """``Pose`` -> ``world_from_agent`` ``[4, 4]``."""
    values = (pose.x_m, pose.y_m, pose.z_m, pose.roll_rad, pose.pitch_rad, pose.yaw_rad)
    if not all(math.isfinite(v) for v in values):
        raise FramingError(f"pose has a non-finite value: {values}")
    cr, sr = math.cos(pose.roll_rad), math.sin(pose.roll_rad)
    cp, sp = math.cos(pose.pitch_rad), math.sin(pose.pitch_rad)
    cy, sy = math.cos(pose.yaw_rad), math.sin(pose.yaw_rad)
    return np.array([[cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr, pose.x_m],
                     [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr, pose.y_m],
                     [-sp, cp * sr, cp * cr, pose.z_m],
                     [0.0, 0.0, 0.0, 1.0]])


def boxes_to_proto(boxes: np.ndarray) -> list[Box3D]:
    """``[K, 9]`` (x, y, z, l, w, h, yaw, score, label) -> ``Box3D`` messages."""
    out = []
    for b in np.asarray(boxes, dtype=np.float64).reshape(-1, 9):
        out.append(Box3D(x_m=b[0], y_m=b[1], z_m=b[2], length_m=b[3], width_m=b[4], height_m=b[5], yaw_rad=b[6],
                         score=b[7], label=LABEL_TO_CLASS.get(int(b[8]), ObjectClass.OBJECT_CLASS_UNKNOWN)))
    return out


def boxes_from_proto(boxes: Iterable[Box3D]) -> np.ndarray:
    """``Box3D`` messages -> ``[K, 9]`` (unknown classes get label -1)."""
    rows = [[b.x_m, b.y_m, b.z_m, b.length_m, b.width_m, b.height_m, b.yaw_rad, b.score,
             CLASS_TO_LABEL.get(b.label, -1)] for b in boxes]
    return np.array(rows, dtype=np.float64).reshape(-1, 9)


def feature_frame(*, agent_id: int, sequence: int, capture_time_ns: int, world_from_agent: np.ndarray,
                  grid: GridSpec, codec_id: str, rate_level: int, tiles: Iterable[TileLike], tile_count: int,
                  detections: np.ndarray | None = None, session_id: int = 0, send_time_ns: int = 0,
                  feature_dtype: int = FeatureDtype.FEATURE_DTYPE_UNSPECIFIED, auth_token: str = "",
                  pose_covariance: np.ndarray | None = None, odom_from_agent: np.ndarray | None = None,
                  odometry_covariance: np.ndarray | None = None, pose_correction_sequence: int = 0,
                  scan_blocks: Iterable[bytes] = (), own_pose: np.ndarray | None = None,
                  own_pose_covariance: np.ndarray | None = None) -> FeatureFrame:
    """One agent-frame as a message (unchunked). ``feature_dtype`` matters for :data:`RAW_CODEC_ID` only.

    ``pose_covariance`` and ``odometry_covariance`` are ``[6, 6]`` (see ``Pose.covariance``);
    ``odom_from_agent`` is the agent's dead-reckoned pose (``FeatureFrame.odometry``); ``scan_blocks``
    a registration scan (:func:`models.scan.pack_scan`); ``own_pose`` where the agent's own GNSS/INS alone
    puts the frame (``FeatureFrame.own_pose``, with its ``[6, 6]`` covariance).
    """
    return FeatureFrame(agent_id=agent_id, session_id=session_id, sequence=sequence,
                        capture_time_ns=capture_time_ns, send_time_ns=send_time_ns,
                        pose=pose_to_proto(world_from_agent, pose_covariance), grid=grid.to_proto(),
                        codec_id=codec_id, rate_level=rate_level,
                        tiles=[dict(index=t.index, payload=t.payload, crc32=t.crc32, relevance=t.relevance)
                               for t in tiles],
                        tile_count=tile_count, feature_dtype=feature_dtype, auth_token=auth_token,
                        detections=boxes_to_proto(detections) if detections is not None else [],
                        odometry=(pose_to_proto(odom_from_agent, odometry_covariance)
                                  if odom_from_agent is not None else None),
                        pose_correction_sequence=pose_correction_sequence, scan_blocks=list(scan_blocks),
                        own_pose=pose_to_proto(own_pose, own_pose_covariance) if own_pose is not None else None)


def grid_from_proto(spec: BevGridSpec) -> GridSpec:
    """``BevGridSpec`` -> :class:`GridSpec` (checks that the extent is whole cells)."""
    grid = GridSpec(spec.x_min_m, spec.x_max_m, spec.y_min_m, spec.y_max_m, spec.cell_size_m, spec.channels,
                    spec.tile_size_cells)
    if not spec.cell_size_m > 0 or (grid.height_cells, grid.width_cells) != (spec.height_cells, spec.width_cells):
        raise FramingError(f"grid spec is inconsistent: {spec.height_cells}x{spec.width_cells} cells of "
                           f"{spec.cell_size_m} m over x [{spec.x_min_m}, {spec.x_max_m}], "
                           f"y [{spec.y_min_m}, {spec.y_max_m}]")
    return grid


CHUNK_HEADER_SLACK_BYTES = 24
"""Room kept in a chunk for the chunk fields and tile framing that the size estimate leaves out."""


def split_frame(frame: FeatureFrame, max_chunk_bytes: int = 1100) -> list[FeatureFrame]:
    """Split a frame into chunks of at most about ``max_chunk_bytes`` that each decode alone.

    Every chunk is a ``FeatureFrame`` with the frame's header (agent, session, sequence, times,
    pose, grid, codec, tile count) and a disjoint set of *whole* tiles, packed most relevant
    first so that the first chunks carry what matters most. Chunk 0 also carries the object
    list (its surest boxes, as many as fit), calibration and credential. A tile larger than a
    chunk gets a chunk of its own. Registration-scan blocks follow the tiles, packed the same way
    (each decodes alone, so a lost chunk loses only its own).
    A frame that fits in one chunk is returned as it is (``chunk_count`` 0: unchunked).
    """
    if max_chunk_bytes < 200:
        raise FramingError(f"max_chunk_bytes {max_chunk_bytes} is too small for a chunk header")
    if frame.ByteSize() <= max_chunk_bytes:
        return [frame]
    header = FeatureFrame()
    header.CopyFrom(frame)
    del header.tiles[:]
    del header.detections[:]
    del header.scan_blocks[:]
    header.ClearField("calibration")
    header.auth_token = ""
    first = FeatureFrame()
    first.CopyFrom(header)
    budget = max_chunk_bytes - CHUNK_HEADER_SLACK_BYTES
    for box in sorted(frame.detections, key=lambda b: -b.score):  # the surest boxes, as many as fit
        if first.ByteSize() + box.ByteSize() + 3 > budget:
            break
        first.detections.append(box)
    if frame.HasField("calibration"):
        first.calibration.CopyFrom(frame.calibration)
    first.auth_token = frame.auth_token
    chunks: list[FeatureFrame] = [first]
    size = first.ByteSize()
    items = [("tiles", tile, tile.ByteSize() + 3)  # field tag and length prefix
             for tile in sorted(frame.tiles, key=lambda t: (-t.relevance, t.index))]
    items += [("scan_blocks", block, len(block) + 3) for block in frame.scan_blocks]
    for name, item, item_bytes in items:
        last = chunks[-1]
        if size + item_bytes > budget and len(last.tiles) + len(last.detections) + len(last.scan_blocks) > 0:
            chunk = FeatureFrame()
            chunk.CopyFrom(header)
            chunks.append(chunk)
            size = chunk.ByteSize()
        getattr(chunks[-1], name).append(item)
        size += item_bytes
    for index, chunk in enumerate(chunks):
        chunk.chunk_index = index
        chunk.chunk_count = len(chunks)
    return chunks


@dataclass(slots=True)
class LatestChunks:
    """What a chunked uplink has yet to send: the newest frame, split into chunks when it is taken up.

    Latest wins: :meth:`offer` replaces a frame not yet taken up, and whatever is left unsent of the
    frame being sent (its chunks would only arrive stale). Counted in ``counters`` (an uplink's
    ``offered``, ``dropped_stale``: frames replaced before any chunk left, ``chunks_dropped_stale``,
    ``sent``: frames of which a chunk left, ``chunks_sent``).
    """

    max_chunk_bytes: int
    counters: ChunkCounters
    _slot: FeatureFrame | None = None
    _chunks: deque[FeatureFrame] = field(default_factory=deque)
    _frame_started: bool = False

    def __post_init__(self) -> None:
        if self.max_chunk_bytes < 200:
            raise FramingError(f"max_chunk_bytes {self.max_chunk_bytes} is too small for a chunk header (>= 200)")

    def offer(self, frame: FeatureFrame) -> None:
        self.counters.offered += 1
        if self._slot is not None or (self._chunks and not self._frame_started):
            self.counters.dropped_stale += 1
        self.counters.chunks_dropped_stale += len(self._chunks)
        self._chunks.clear()
        self._slot = frame

    @property
    def idle(self) -> bool:
        """``True`` when no frame or chunk is waiting to be sent."""
        return self._slot is None and not self._chunks

    def peek(self) -> FeatureFrame | None:
        """The next chunk to send (taking up the waiting frame if no chunk is left), or ``None``."""
        if not self._chunks and self._slot is not None:
            frame, self._slot = self._slot, None
            self._chunks.extend(split_frame(frame, self.max_chunk_bytes))
            self._frame_started = False
        return self._chunks[0] if self._chunks else None

    def sent(self) -> None:
        """The chunk :meth:`peek` returned has left."""
        self._chunks.popleft()
        if not self._frame_started:
            self._frame_started = True
            self.counters.sent += 1
        self.counters.chunks_sent += 1
