"""Recording a session to MCAP (``cpstream launch FILE --record OUT.mcap``); ``cpstream replay`` reads it back.

Log time is the sensor clock: a slot's messages are logged at the slot's capture time
(``slot * period_ns``), an agent's frame at its own capture time. Frame ids: ``world``,
``agent_<id>`` (that agent's BEV frame, e.g. ``agent_0``, ``agent_-1``), ``fusion`` (the
fused frame's reference, ``FusedFrame.reference_pose``) and ``ground_truth`` (the ego's
BEV frame the ground-truth boxes are given in).

Channels (topic: schema, encoding; what):

- ``/cpstream/session``: ``cpstream.Session``, JSON; once, first: rate, period, start slot, frames,
  agents, the fusion settings (without tokens), the world folder.
- ``/cpstream/ground_truth``: ``cpstream.GroundTruth``, JSON; per frame index: ``index``, ``slot``,
  ``capture_time_ns``, ``boxes`` ``[M, 7]`` in the ego's BEV frame, ``world_from_ego`` (4x4).
- ``/cpstream/agent_<id>/features``: ``cp.v1.FeatureFrame``, protobuf; the agent's frames as the
  fusion node received them, each once, when first used (fresh or standing in). ``cpstream replay`` streams these.
- ``/cpstream/agent_<id>/points``: ``foxglove.PointCloud``; the agent's LiDAR points (x, y, z float32,
  intensity uint8) in ``agent_<id>``, cropped to its BEV grid and thinned to :data:`MAX_POINTS`.
- ``/cpstream/agent_<id>/boxes``: ``foxglove.SceneUpdate``; the agent's own detections, in ``agent_<id>``.
- ``/cpstream/fused``: ``cp.v1.FusedFrame``, protobuf; the fused frames (``agent_frames`` left out).
- ``/cpstream/fused/boxes``: ``foxglove.SceneUpdate``; fused boxes, in ``fusion``.
- ``/cpstream/ground_truth/boxes``: ``foxglove.SceneUpdate``; ground-truth boxes, in ``ground_truth``.
- ``/tf``: ``foxglove.FrameTransforms``; per fused slot, ``world`` -> each ``agent_<id>``, ``fusion``
  and ``ground_truth``.

Point clouds are read from the rendered world for each fused slot's frame index (none when the
agents render the world live, ``source: world``; their transforms then come from the poses in
their feature frames).

The recorder never slows the session: :meth:`Recorder.add` only queues the fused frame;
one writer thread reads point clouds (a fast path for the files the world renderer writes,
the dataset reader otherwise), builds the messages and writes the file. :meth:`Recorder.close`
drains the queue and writes the summary, so an interrupted launch still leaves a valid file.
Credentials are never recorded (``FeatureFrame.auth_token`` is cleared).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import re
import threading
from pathlib import Path

import numpy as np
import yaml
from foxglove_schemas_protobuf.Color_pb2 import Color
from foxglove_schemas_protobuf.CubePrimitive_pb2 import CubePrimitive
from foxglove_schemas_protobuf.FrameTransform_pb2 import FrameTransform
from foxglove_schemas_protobuf.FrameTransforms_pb2 import FrameTransforms
from foxglove_schemas_protobuf.PackedElementField_pb2 import PackedElementField
from foxglove_schemas_protobuf.PointCloud_pb2 import PointCloud
from foxglove_schemas_protobuf.Pose_pb2 import Pose as FoxglovePose
from foxglove_schemas_protobuf.Quaternion_pb2 import Quaternion
from foxglove_schemas_protobuf.SceneEntity_pb2 import SceneEntity
from foxglove_schemas_protobuf.SceneUpdate_pb2 import SceneUpdate
from foxglove_schemas_protobuf.Vector3_pb2 import Vector3
from mcap.writer import CompressionType, Writer
from mcap_protobuf.schema import register_schema

from agents import AgentFrame, AgentKind, Scenario, bev_input
from agents.opv2v import read_agent_frame
from models.geometry import invert_se3, opv2v_pose_to_matrix
from protos import BevGridSpec, FeatureFrame, FusedFrame, SubscribeRequest
from transport import boxes_from_proto, pose_from_proto

log = logging.getLogger(__name__)

SESSION_TOPIC = "/cpstream/session"
GROUND_TRUTH_TOPIC = "/cpstream/ground_truth"
FUSED_TOPIC = "/cpstream/fused"
FUSED_BOXES_TOPIC = "/cpstream/fused/boxes"
GROUND_TRUTH_BOXES_TOPIC = "/cpstream/ground_truth/boxes"
TF_TOPIC = "/tf"
FEATURES_TOPIC = re.compile(r"^/cpstream/agent_(-?\d+)/features$")
WORLD, FUSION, GROUND_TRUTH = "world", "fusion", "ground_truth"
FORMAT_VERSION = 1
MAX_POINTS = 4096
"""Points kept per agent frame after cropping to its BEV grid (every k-th point): ~26 KB each in the file."""
POINT_QUANTUM_M = 1.0 / 64
"""Point coordinates are rounded to this (a power of two: the float32 mantissas end in zeros and compress)."""
_POINT_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "u1")])
"""One recorded point: 13 bytes, intensity in [0, 1] scaled to 0..255."""

SESSION_SCHEMA = {
    "type": "object", "title": "cpstream.Session",
    "properties": {"version": {"type": "integer"}, "rate_hz": {"type": "number"}, "period_ns": {"type": "integer"},
                   "start_slot": {"type": "integer"}, "frames": {"type": ["integer", "null"]},
                   "agent_ids": {"type": "array", "items": {"type": "integer"}},
                   "fusion": {"type": "object"}, "world_folder": {"type": ["string", "null"]}},
}
GROUND_TRUTH_SCHEMA = {
    "type": "object", "title": "cpstream.GroundTruth",
    "properties": {"index": {"type": "integer"}, "slot": {"type": "integer"},
                   "capture_time_ns": {"type": "integer"},
                   "boxes": {"type": "array", "items": {"type": "array", "items": {"type": "number"}},
                             "description": "[M, 7+] x, y, z, l, w, h, yaw, ... in the ego's BEV frame"},
                   "world_from_ego": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}},
}
_FUSED_COLOR = Color(r=0.1, g=0.9, b=0.2, a=0.6)
_TRUTH_COLOR = Color(r=1.0, g=1.0, b=1.0, a=0.25)
_AGENT_COLORS = [Color(r=0.2, g=0.5, b=1.0, a=0.5), Color(r=1.0, g=0.6, b=0.1, a=0.5),
                 Color(r=0.8, g=0.2, b=0.9, a=0.5), Color(r=0.1, g=0.9, b=0.9, a=0.5)]
WRITER_NICE = 10
"""Niceness of the writer thread: under load it falls behind (its queue grows) instead of slowing the agents."""
_STOP = object()


def agent_frame_id(agent_id: int) -> str:
    return f"agent_{agent_id}"


def features_topic(agent_id: int) -> str:
    return f"/cpstream/agent_{agent_id}/features"


class Recorder:
    """Writes a launch session to an MCAP file (see the module docstring for its channels).

    Args:
        path: the ``.mcap`` file to write (its folder is created).
        folder: the rendered world's scenario folder (point clouds); ``None`` records none.
        truth: the launcher's ``GroundTruth`` (per frame index: ``boxes``, ``world_from_ego``), or ``None``.
        start_slot: the fusion slot of frame index 0.
        period_ns: the sensor period.
        agent_ids: the agents of the session (whose point clouds are recorded).
        fusion: the fusion node's settings, recorded (without tokens) so a replay fuses the same way.
        max_points: points kept per agent frame.
    """

    request = SubscribeRequest(include_agent_frames=True)
    """What to subscribe with: the recorder needs the agents' frames."""

    def __init__(self, path: Path, *, folder: Path | None, truth, start_slot: int, period_ns: int,
                 agent_ids: list[int] | tuple[int, ...] = (), fusion: dict | None = None,
                 max_points: int = MAX_POINTS) -> None:
        self.path = Path(path)
        self.folder, self.truth = folder, truth
        self.start_slot, self.period_ns = int(start_slot), int(period_ns)
        self.agent_ids = [int(a) for a in agent_ids]
        self.max_points = max_points
        self.stamps = Scenario(folder, load_images=False).stamps if folder is not None else ()
        self.counts: dict[str, int] = {}
        self.error: str | None = None
        self._grid: BevGridSpec | None = None
        self._truth_written: set[int] = set()
        self._points_written: set[int] = set()
        self._agents_seen: set[tuple[int, int]] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("wb")
        self._writer = Writer(self._file, chunk_size=4 * 1024 * 1024, compression=CompressionType.ZSTD)
        self._writer.start(profile="", library="cpstream")
        self._schemas: dict[str, int] = {}
        self._channels: dict[str, int] = {}
        frames = len(truth.boxes) if truth is not None else (len(self.stamps) or None)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in (fusion or {}).items()
                    if k not in ("tokens", "tls", "listen")}
        session = {"version": FORMAT_VERSION, "rate_hz": 1e9 / self.period_ns, "period_ns": self.period_ns,
                   "start_slot": self.start_slot, "frames": frames, "agent_ids": self.agent_ids,
                   "fusion": settings, "world_folder": str(folder) if folder is not None else None}
        self._write_json(SESSION_TOPIC, SESSION_SCHEMA, session, self.start_slot * self.period_ns)
        self._writer.add_metadata("cpstream", {k: json.dumps(v, default=str) for k, v in session.items()})
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mcap-recorder", daemon=True)
        self._thread.start()

    # ---- the session side (event loop) ----------------------------------------------------------

    def add(self, fused: FusedFrame) -> None:
        """Queue one fused frame (with its ``agent_frames``) for writing; never blocks."""
        if not self._closed:
            self._queue.put(fused)

    def close(self) -> dict:
        """Write what is queued, the remaining ground truth and the summary; returns ``path``, ``bytes``,
        ``messages`` (and ``channels``: messages per topic, ``error`` if writing failed)."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
            try:
                if self.error is None and self.truth is not None:
                    for index in range(len(self.truth.boxes)):
                        self._write_truth(index)
                self._writer.finish()
            except Exception as err:  # noqa: BLE001 - a failed recording must not lose the session's report
                self.error = self.error or f"{type(err).__name__}: {err}"
            finally:
                self._file.close()
            if self.error is not None:
                log.error("recording %s failed: %s", self.path, self.error)
        result = {"path": str(self.path), "bytes": self.path.stat().st_size if self.path.exists() else 0,
                  "messages": sum(self.counts.values()), "channels": dict(sorted(self.counts.items()))}
        if self.error is not None:
            result["error"] = self.error
        return result

    # ---- the writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux nices threads: yield the CPU to the session
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self.error is not None:
                continue
            try:
                self._write_fused(item)
            except Exception as err:  # noqa: BLE001 - reported by close(), the session goes on
                self.error = f"{type(err).__name__}: {err}"
                log.error("recording %s: %s; nothing more is written", self.path, self.error)

    def _channel(self, topic: str, schema_name: str, encoding: str, schema_data: bytes | None = None,
                 message_class=None) -> int:
        if topic not in self._channels:
            if schema_name not in self._schemas:
                self._schemas[schema_name] = (
                    register_schema(self._writer, message_class) if message_class is not None
                    else self._writer.register_schema(name=schema_name, encoding="jsonschema", data=schema_data))
            self._channels[topic] = self._writer.register_channel(
                topic=topic, message_encoding=encoding, schema_id=self._schemas[schema_name])
        return self._channels[topic]

    def _write(self, topic: str, message, log_time_ns: int, publish_time_ns: int | None = None) -> None:
        channel = self._channel(topic, type(message).DESCRIPTOR.full_name, "protobuf", message_class=type(message))
        self._add(channel, topic, message.SerializeToString(), log_time_ns, publish_time_ns)

    def _write_json(self, topic: str, schema: dict, value: dict, log_time_ns: int) -> None:
        channel = self._channel(topic, schema["title"], "json", json.dumps(schema).encode())
        self._add(channel, topic, json.dumps(value, default=str).encode(), log_time_ns, None)

    def _add(self, channel: int, topic: str, data: bytes, log_time_ns: int, publish_time_ns: int | None) -> None:
        log_time_ns = max(int(log_time_ns), 0)
        sequence = self.counts.get(topic, 0)
        self._writer.add_message(channel_id=channel, log_time=log_time_ns, data=data,
                                 publish_time=max(int(publish_time_ns or log_time_ns), 0), sequence=sequence)
        self.counts[topic] = sequence + 1

    def _write_fused(self, fused: FusedFrame) -> None:
        slot_ns = fused.sequence * self.period_ns
        index = fused.sequence - self.start_slot
        agent_poses: dict[int, np.ndarray] = {}
        for frame in fused.agent_frames:
            key = (frame.agent_id, frame.sequence)
            if key in self._agents_seen:  # the same frame twice: record it once
                continue
            self._agents_seen.add(key)
            self._grid = frame.grid
            self._write_agent_frame(frame)
            agent_poses[frame.agent_id] = pose_from_proto(frame.pose)
        bare = FusedFrame()
        bare.CopyFrom(fused)
        bare.ClearField("agent_frames")
        self._write(FUSED_TOPIC, bare, slot_ns, fused.publish_time_ns)
        transforms = []
        if fused.HasField("reference_pose"):
            reference = pose_from_proto(fused.reference_pose)
            transforms.append(_transform(WORLD, FUSION, reference, slot_ns))
            self._write(FUSED_BOXES_TOPIC, _scene("fused", FUSION, boxes_from_proto(fused.boxes), slot_ns,
                                                  _FUSED_COLOR), slot_ns)
        if self.truth is not None and 0 <= index < len(self.truth.boxes):
            world_from_truth = self.truth.world_from_ego[index]  # as the ego's own fix places it
            if fused.HasField("reference_pose") and fused.HasField("reference_own_pose"):  # an ego tracking its pose
                world_from_truth = (pose_from_proto(fused.reference_pose)
                                    @ invert_se3(pose_from_proto(fused.reference_own_pose)) @ world_from_truth)
            transforms.append(_transform(WORLD, GROUND_TRUTH, world_from_truth, slot_ns))
            self._write_truth(index)
        if 0 <= index < len(self.stamps) and index not in self._points_written and self._grid is not None:
            self._points_written.add(index)
            for agent_id in self.agent_ids:
                world_from_bev = self._write_points(agent_id, index, slot_ns)
                if world_from_bev is not None:
                    agent_poses[agent_id] = world_from_bev
        transforms.extend(_transform(WORLD, agent_frame_id(a), m, slot_ns) for a, m in sorted(agent_poses.items()))
        if transforms:
            self._write(TF_TOPIC, FrameTransforms(transforms=transforms), slot_ns)

    def _write_agent_frame(self, frame: FeatureFrame) -> None:
        clean = FeatureFrame()
        clean.CopyFrom(frame)
        clean.auth_token = ""  # never record a credential
        self._write(features_topic(frame.agent_id), clean, frame.capture_time_ns, frame.send_time_ns or None)
        self._write(f"/cpstream/agent_{frame.agent_id}/boxes",
                    _scene(f"agent_{frame.agent_id}", agent_frame_id(frame.agent_id),
                           boxes_from_proto(frame.detections), frame.capture_time_ns,
                           _AGENT_COLORS[frame.agent_id % len(_AGENT_COLORS)]), frame.capture_time_ns)

    def _write_truth(self, index: int) -> None:
        if index in self._truth_written:
            return
        self._truth_written.add(index)
        slot = self.start_slot + index
        boxes = np.asarray(self.truth.boxes[index], dtype=np.float64)
        self._write_json(GROUND_TRUTH_TOPIC, GROUND_TRUTH_SCHEMA, {
            "index": index, "slot": slot, "capture_time_ns": slot * self.period_ns, "boxes": boxes.tolist(),
            "world_from_ego": np.asarray(self.truth.world_from_ego[index], dtype=np.float64).tolist()},
            slot * self.period_ns)
        self._write(GROUND_TRUTH_BOXES_TOPIC, _scene("ground_truth", GROUND_TRUTH, boxes, slot * self.period_ns,
                                                     _TRUTH_COLOR), slot * self.period_ns)

    def _write_points(self, agent_id: int, index: int, log_time_ns: int) -> np.ndarray | None:
        """The agent's points of frame ``index`` in its BEV frame; returns that frame's ``world_from_bev``."""
        agent_dir = self.folder / str(agent_id)
        if not agent_dir.is_dir():
            return None
        world_from_lidar, points = read_lidar(agent_dir, self.stamps[index])
        points = points[::max(1, len(points) // (2 * self.max_points))]  # thin first: moving 55k points costs ms
        kind = AgentKind.ROADSIDE_UNIT if agent_id < 0 else AgentKind.VEHICLE
        agent = AgentFrame(agent_id=agent_id, kind=kind, world_from_lidar=world_from_lidar,
                           true_world_from_lidar=None, points=points)
        world_from_bev, _, bev_points = bev_input(agent, self._grid.cell_size_m)
        g = self._grid
        keep = ((bev_points[:, 0] >= g.x_min_m) & (bev_points[:, 0] < g.x_max_m)
                & (bev_points[:, 1] >= g.y_min_m) & (bev_points[:, 1] < g.y_max_m))
        bev_points = bev_points[keep]
        stride = max(1, math.ceil(len(bev_points) / self.max_points))
        bev_points = bev_points[::stride]
        packed = np.zeros(len(bev_points), dtype=_POINT_DTYPE)
        for axis, name in enumerate("xyz"):
            packed[name] = np.round(bev_points[:, axis] / POINT_QUANTUM_M) * POINT_QUANTUM_M
        packed["intensity"] = np.clip(np.round(bev_points[:, 3] * 255.0), 0, 255)
        cloud = PointCloud(frame_id=agent_frame_id(agent_id), point_stride=_POINT_DTYPE.itemsize,
                           data=packed.tobytes(), pose=FoxglovePose(orientation=Quaternion(w=1.0)),
                           fields=[PackedElementField(name=name, offset=_POINT_DTYPE.fields[name][1],
                                                      type=PackedElementField.UINT8 if name == "intensity"
                                                      else PackedElementField.FLOAT32)
                                   for name in _POINT_DTYPE.names])
        cloud.timestamp.FromNanoseconds(log_time_ns)
        self._write(f"/cpstream/agent_{agent_id}/points", cloud, log_time_ns)
        return world_from_bev


# ---- reading our own rendered files fast ---------------------------------------------------------

_LIDAR_POSE = re.compile(r"^lidar_pose:[ \t]*(\[[^\]\n]*\])[ \t]*$", re.MULTILINE)


def read_lidar(agent_dir: Path, stamp: str) -> tuple[np.ndarray, np.ndarray]:
    """(``world_from_lidar`` as reported, points ``[N, 4]`` in the LiDAR frame) of one agent frame.

    Reads only the pose line and the binary point block of the files the world renderer writes
    (~1 ms instead of ~45 ms for parsing the whole frame); anything else goes through the dataset reader.
    """
    try:
        match = _LIDAR_POSE.search((agent_dir / f"{stamp}.yaml").read_text())
        pose = yaml.safe_load(match.group(1)) if match else None
        points = _binary_pcd(agent_dir / f"{stamp}.pcd")
        if points is not None and isinstance(pose, list) and len(pose) == 6:
            return opv2v_pose_to_matrix(np.asarray(pose, dtype=np.float64)), points
    except (OSError, ValueError, TypeError, yaml.YAMLError):
        pass
    frame = read_agent_frame(agent_dir, stamp, load_images=False)
    return frame.world_from_lidar, frame.points


def _binary_pcd(path: Path) -> np.ndarray | None:
    """``[N, 4]`` float32 from a binary PCD with float32 ``x y z [intensity]`` fields, else ``None``."""
    raw = path.read_bytes()
    header: dict[str, list[str]] = {}
    offset = 0
    while offset < len(raw) and "DATA" not in header:
        end = raw.find(b"\n", offset)
        if end < 0:
            return None
        words = raw[offset:end].decode("ascii", "replace").split()
        offset = end + 1
        if words and not words[0].startswith("#"):
            header[words[0].upper()] = words[1:]
    fields = header.get("FIELDS", [])
    if (header.get("DATA") != ["binary"] or fields not in (["x", "y", "z"], ["x", "y", "z", "intensity"])
            or header.get("SIZE") != ["4"] * len(fields) or header.get("TYPE") != ["F"] * len(fields)
            or header.get("COUNT", ["1"] * len(fields)) != ["1"] * len(fields)):
        return None
    n = int(header.get("POINTS", ["-1"])[0])
    if n < 0 or len(raw) - offset < n * 4 * len(fields):
        return None
    values = np.frombuffer(raw, dtype="<f4", count=n * len(fields), offset=offset).reshape(n, len(fields))
    if len(fields) == 3:
        values = np.concatenate([values, np.zeros((n, 1), np.float32)], axis=1)
    return values.astype(np.float32)


# ---- foxglove messages ---------------------------------------------------------------------------

def _quaternion(rotation: np.ndarray) -> Quaternion:
    """A unit quaternion from a 3x3 rotation matrix."""
    m = np.asarray(rotation, dtype=np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = 2.0 * math.sqrt(trace + 1.0)
        w, x, y, z = 0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        w, x, y, z = (m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        w, x, y, z = (m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s
    else:
        s = 2.0 * math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        w, x, y, z = (m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s
    return Quaternion(x=x, y=y, z=z, w=w)


def _transform(parent: str, child: str, parent_from_child: np.ndarray, time_ns: int) -> FrameTransform:
    m = np.asarray(parent_from_child, dtype=np.float64)
    out = FrameTransform(parent_frame_id=parent, child_frame_id=child,
                         translation=Vector3(x=m[0, 3], y=m[1, 3], z=m[2, 3]), rotation=_quaternion(m[:3, :3]))
    out.timestamp.FromNanoseconds(time_ns)
    return out


def _scene(entity_id: str, frame_id: str, boxes: np.ndarray, time_ns: int, color: Color) -> SceneUpdate:
    """One entity (replacing the previous one of the same id) with a cube per box ``[x, y, z, l, w, h, yaw, ...]``."""
    entity = SceneEntity(id=entity_id, frame_id=frame_id, frame_locked=True)
    entity.timestamp.FromNanoseconds(time_ns)
    rows = np.asarray(boxes, dtype=np.float64)
    for b in rows.reshape(-1, rows.shape[-1] if rows.ndim == 2 else 7):
        half = 0.5 * float(b[6])
        entity.cubes.append(CubePrimitive(
            pose=FoxglovePose(position=Vector3(x=b[0], y=b[1], z=b[2]),
                              orientation=Quaternion(z=math.sin(half), w=math.cos(half))),
            size=Vector3(x=b[3], y=b[4], z=b[5]), color=color))
    return SceneUpdate(entities=[entity])


__all__ = ["FEATURES_TOPIC", "FUSED_TOPIC", "GROUND_TRUTH_TOPIC", "SESSION_TOPIC", "Recorder", "agent_frame_id",
           "features_topic", "read_lidar"]
