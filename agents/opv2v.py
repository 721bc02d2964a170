"""Read and write scenarios in the OPV2V folder layout.

``ROOT/<scenario>/<agent_id>/NNNNNN.{yaml,pcd}`` and ``NNNNNN_cameraK.png``;
agent ids are integers, roadside units negative. The per-frame yaml holds
``lidar_pose`` ([x, y, z, roll, yaw, pitch], degrees, CARLA's convention),
``vehicles`` (ground truth) and ``cameraK`` calibration, as the OPV2V loader
reads them. What we add (pedestrians, exact poses, OpenCV-convention camera
mounts) lives under the ``cpstream`` key, so a real OPV2V download loads the
same way and our files still load in OPV2V tooling.

Every problem with a file raises :class:`DatasetError` naming the file and
what is wrong with it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import open3d as o3d
import yaml

from agents.frames import AgentFrame, AgentKind, CameraImage, ObjectClass, ObjectState, SceneFrame
from models.geometry import invert_se3, matrix_to_opv2v_pose, opv2v_pose_to_matrix

log = logging.getLogger(__name__)

OUR_KEY = "cpstream"
CORDS_FROM_CV = np.array([[0.0, 0.0, 1.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
"""From the OpenCV camera frame (x right, y down, z forward) to x forward, y left, z up."""
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class DatasetError(Exception):
    """A dataset file is missing or malformed; the message names the file."""


_EMPTY_PCD = (b"# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\nFIELDS x y z intensity\nSIZE 4 4 4 4\n"
              b"TYPE F F F F\nCOUNT 1 1 1 1\nWIDTH 0\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS 0\nDATA binary\n")


# ----------------------------------------------------------------------------- point clouds

def write_pcd(path: Path, points: np.ndarray) -> None:
    """Write ``[N, 4]`` x, y, z, intensity as a binary PCD file (``N`` may be 0)."""
    if len(points) == 0:
        # open3d refuses to write a cloud without points; an empty sweep is still a valid frame.
        try:
            Path(path).write_bytes(_EMPTY_PCD)
        except OSError as err:
            raise DatasetError(f"{path}: could not write point cloud: {err.strerror}") from err
        return
    cloud = o3d.t.geometry.PointCloud(o3d.core.Tensor(np.ascontiguousarray(points[:, :3], dtype=np.float32)))
    cloud.point.intensity = o3d.core.Tensor(np.ascontiguousarray(points[:, 3:4], dtype=np.float32))
    if not o3d.t.io.write_point_cloud(str(path), cloud):
        raise DatasetError(f"{path}: could not write point cloud")


def _pcd_header(path: Path, raw: bytes) -> tuple[dict[str, list[str]], int]:
    """Parse the header; return its fields and where the data starts."""
    header: dict[str, list[str]] = {}
    offset = 0
    while True:
        end = raw.find(b"\n", offset)
        if end < 0:
            raise DatasetError(f"{path}: not a PCD file: header has no DATA line")
        line = raw[offset:end].decode("ascii", errors="replace").strip()
        offset = end + 1
        if not line or line.startswith("#"):
            continue
        key, *values = line.split()
        header[key.upper()] = values
        if key.upper() == "DATA":
            break
    for key in ("FIELDS", "SIZE", "POINTS", "DATA"):
        if key not in header:
            raise DatasetError(f"{path}: not a PCD file: header lacks {key}")
    return header, offset


def read_pcd(path: Path) -> np.ndarray:
    """Read a PCD file into ``[N, 4]`` float32 x, y, z, intensity (0 when absent).

    Raises:
        DatasetError: missing, not PCD, or shorter than its header declares.
    """
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read: {err.strerror}") from err
    header, data_start = _pcd_header(path, raw)
    try:
        n_points = int(header["POINTS"][0])
        counts = [int(c) for c in header.get("COUNT", ["1"] * len(header["FIELDS"]))]
        row_bytes = sum(int(s) * c for s, c in zip(header["SIZE"], counts))
    except (ValueError, IndexError) as err:
        raise DatasetError(f"{path}: malformed PCD header: {err}") from err
    fmt = header["DATA"][0].lower()
    if fmt == "binary" and len(raw) - data_start < n_points * row_bytes:
        raise DatasetError(f"{path}: truncated: header declares {n_points} points ({n_points * row_bytes} bytes), "
                           f"file holds {len(raw) - data_start} bytes of data")
    if fmt == "ascii":
        # open3d fills the rows a short ASCII file lacks with uninitialised memory instead of failing.
        rows = sum(1 for line in raw[data_start:].splitlines() if line.strip())
        if rows < n_points:
            raise DatasetError(f"{path}: truncated: header declares {n_points} points, file holds {rows} data lines")
    if n_points == 0:
        return np.zeros((0, 4), np.float32)  # open3d cannot parse a header without points
    cloud = o3d.t.io.read_point_cloud(str(path))
    xyz = cloud.point.positions.numpy() if "positions" in cloud.point else np.zeros((0, 3), np.float32)
    if len(xyz) != n_points:
        raise DatasetError(f"{path}: truncated or corrupt: header declares {n_points} points, read {len(xyz)}")
    intensity = cloud.point.intensity.numpy() if "intensity" in cloud.point else np.zeros((len(xyz), 1), np.float32)
    return np.concatenate([xyz, intensity.reshape(-1, 1)], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- writing

def _object_entry(obj: ObjectState) -> dict:
    x, y, z, length, width, height, yaw = (float(v) for v in obj.box_world[:7])
    # location is the ground point under the box; the box centre is location + center.
    return {"location": [x, y, z - height / 2], "center": [0.0, 0.0, height / 2],
            "extent": [length / 2, width / 2, height / 2], "angle": [0.0, float(np.rad2deg(yaw)), 0.0],
            "speed": float(obj.speed_mps * 3.6)}


def _matrix_list(m: np.ndarray) -> list[list[float]]:
    return [[float(v) for v in row] for row in m]


def _frame_yaml(agent: AgentFrame, timestamp_s: float) -> dict:
    doc: dict = {"lidar_pose": matrix_to_opv2v_pose(agent.world_from_lidar)}
    doc["vehicles"] = {o.object_id: _object_entry(o) for o in agent.objects if o.object_class == ObjectClass.VEHICLE}
    ours: dict = {"kind": agent.kind.value, "timestamp_s": timestamp_s,
                  "pedestrians": {o.object_id: _object_entry(o) for o in agent.objects
                                  if o.object_class == ObjectClass.PEDESTRIAN},
                  "cameras": {}}
    if agent.true_world_from_lidar is not None:
        ours["true_lidar_pose"] = matrix_to_opv2v_pose(agent.true_world_from_lidar)
    if agent.pose_covariance is not None:
        ours["pose_covariance"] = _matrix_list(agent.pose_covariance)
    for cam in agent.cameras:
        lidar_from_cords = cam.lidar_from_camera @ invert_se3(CORDS_FROM_CV)
        # OPV2V-style entry: cords is the camera (x forward) in the world, extrinsic camera-to-LiDAR.
        doc[cam.name] = {"cords": matrix_to_opv2v_pose(agent.world_from_lidar @ lidar_from_cords),
                         "extrinsic": _matrix_list(lidar_from_cords), "intrinsic": _matrix_list(cam.intrinsic)}
        entry = {"lidar_from_camera_cv": _matrix_list(cam.lidar_from_camera)}
        if cam.true_lidar_from_camera is not None:
            entry["true_lidar_from_camera_cv"] = _matrix_list(cam.true_lidar_from_camera)
        ours["cameras"][cam.name] = entry
    doc[OUR_KEY] = ours
    return doc


def write_scene_frame(root: Path, frame: SceneFrame) -> None:
    """Write every agent of ``frame`` under ``root/<scenario>/<agent_id>/``."""
    stamp = f"{frame.frame_index:06d}"
    for agent_id, agent in frame.agents.items():
        folder = root / frame.scenario / str(agent_id)
        folder.mkdir(parents=True, exist_ok=True)
        write_pcd(folder / f"{stamp}.pcd", agent.points)
        for cam in agent.cameras:
            if cam.image_rgb is not None:
                cv2.imwrite(str(folder / f"{stamp}_{cam.name}.png"), cam.image_rgb[:, :, ::-1])
        with open(folder / f"{stamp}.yaml", "w") as f:
            yaml.dump(_frame_yaml(agent, frame.timestamp_s), f, Dumper=_Dumper, sort_keys=False, default_flow_style=None)


# ----------------------------------------------------------------------------- reading

def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read: {err.strerror}") from err
    try:
        doc = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise DatasetError(f"{path}: malformed yaml{at}: {getattr(err, 'problem', None) or err}") from err
    if not isinstance(doc, dict):
        raise DatasetError(f"{path}: malformed yaml: expected a mapping at the top, got {type(doc).__name__}")
    return doc


def _numbers(path: Path, where: str, value, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DatasetError(f"{path}: {where} is not numeric: {value!r}") from err
    if arr.shape != shape:
        raise DatasetError(f"{path}: {where} should have shape {shape}, has {arr.shape}")
    return arr


def _objects(path: Path, entries, object_class: ObjectClass, key: str) -> list[ObjectState]:
    if entries is None:
        return []
    if not isinstance(entries, dict):
        raise DatasetError(f"{path}: '{key}' should be a mapping of id to object")
    out = []
    for object_id, entry in entries.items():
        where = f"{key}[{object_id}]"
        if not isinstance(entry, dict) or not {"location", "extent", "angle"} <= entry.keys():
            raise DatasetError(f"{path}: {where} lacks one of location, extent, angle")
        centre = _numbers(path, f"{where}.location", entry["location"], (3,)) + _numbers(
            path, f"{where}.center", entry.get("center", [0.0, 0.0, 0.0]), (3,))
        extent = _numbers(path, f"{where}.extent", entry["extent"], (3,))
        yaw = np.deg2rad(_numbers(path, f"{where}.angle", entry["angle"], (3,))[1])
        box = np.array([*centre, *(2 * extent), yaw])
        out.append(ObjectState(object_id=int(object_id), object_class=object_class, box_world=box,
                               speed_mps=float(entry.get("speed", 0.0)) / 3.6))
    return out


def _cameras(path: Path, doc: dict, world_from_lidar: np.ndarray, folder: Path, stamp: str,
             load_images: bool) -> tuple[CameraImage, ...]:
    ours = (doc.get(OUR_KEY) or {}).get("cameras") or {}
    cams = []
    for k in range(4):
        name = f"camera{k}"
        if name not in doc:
            continue
        entry = doc[name]
        intrinsic = _numbers(path, f"{name}.intrinsic", entry.get("intrinsic"), (3, 3))
        if name in ours:
            mount = _numbers(path, f"{OUR_KEY}.cameras.{name}.lidar_from_camera_cv",
                             ours[name].get("lidar_from_camera_cv"), (4, 4))
            true_value = ours[name].get("true_lidar_from_camera_cv")
            true_mount = None if true_value is None else _numbers(path, f"{name} true mount", true_value, (4, 4))
        else:
            world_from_cords = opv2v_pose_to_matrix(_numbers(path, f"{name}.cords", entry.get("cords"), (6,)))
            mount, true_mount = invert_se3(world_from_lidar) @ world_from_cords @ CORDS_FROM_CV, None
        image = _read_image(folder / f"{stamp}_{name}.png") if load_images else None
        cams.append(CameraImage(name=name, image_rgb=image, intrinsic=intrinsic, lidar_from_camera=mount,
                                true_lidar_from_camera=true_mount))
    return tuple(cams)


def _read_image(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"{path}: missing camera image")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"{path}: not a readable image")
    return image[:, :, ::-1].copy()


def read_agent_frame(folder: Path, stamp: str, load_images: bool = True) -> AgentFrame:
    """Read one agent's frame ``stamp`` from its folder.

    Raises:
        DatasetError: naming the file, for anything missing or malformed.
    """
    path = folder / f"{stamp}.yaml"
    if not path.is_file():
        raise DatasetError(f"{path}: missing (agent {folder.name} has no frame {stamp})")
    try:
        return _parse_agent_frame(folder, stamp, path, _read_yaml(path), load_images)
    except (TypeError, ValueError, AttributeError, KeyError) as err:
        # Values of the wrong type deep in the yaml (a mapping where a list belongs, text for a number).
        raise DatasetError(f"{path}: malformed value: {type(err).__name__}: {err}") from err


def _parse_agent_frame(folder: Path, stamp: str, path: Path, doc: dict, load_images: bool) -> AgentFrame:
    if "lidar_pose" not in doc:
        raise DatasetError(f"{path}: missing key 'lidar_pose'")
    world_from_lidar = opv2v_pose_to_matrix(_numbers(path, "lidar_pose", doc["lidar_pose"], (6,)))
    ours = doc.get(OUR_KEY) or {}
    if not isinstance(ours, dict):
        raise DatasetError(f"{path}: '{OUR_KEY}' should be a mapping")
    true_pose = ours.get("true_lidar_pose")
    agent_id = int(folder.name)
    objects = _objects(path, doc.get("vehicles"), ObjectClass.VEHICLE, "vehicles") + _objects(
        path, ours.get("pedestrians"), ObjectClass.PEDESTRIAN, f"{OUR_KEY}.pedestrians")
    return AgentFrame(
        agent_id=agent_id,
        kind=AgentKind(ours.get("kind", "rsu" if agent_id < 0 else "vehicle")),
        world_from_lidar=world_from_lidar,
        true_world_from_lidar=None if true_pose is None else opv2v_pose_to_matrix(
            _numbers(path, f"{OUR_KEY}.true_lidar_pose", true_pose, (6,))),
        points=read_pcd(folder / f"{stamp}.pcd"),
        cameras=_cameras(path, doc, world_from_lidar, folder, stamp, load_images),
        objects=tuple(objects),
        pose_covariance=None if ours.get("pose_covariance") is None else _numbers(
            path, f"{OUR_KEY}.pose_covariance", ours["pose_covariance"], (6, 6)),
    )


class Scenario:
    """One scenario folder: its agents and their shared timestamps.

    Frames are the ego's timestamps (the ego is the smallest non-negative
    agent id). Reading a frame for which another agent has no file raises
    :class:`DatasetError` naming the missing file.
    """

    def __init__(self, path: Path, load_images: bool = True) -> None:
        self.path = path
        self.name = path.name
        self.load_images = load_images
        ids = []
        for child in sorted(path.iterdir()):
            if child.is_dir():
                if _is_int(child.name):
                    ids.append(int(child.name))
                else:
                    log.debug("skipping %s: not an agent folder", child)
        if not ids:
            raise DatasetError(f"{path}: no agent folders (integer names) in scenario")
        if not any(a >= 0 for a in ids):
            raise DatasetError(f"{path}: only roadside units (negative ids); a vehicle agent is needed as ego")
        self.agent_ids = tuple(sorted(ids, key=lambda a: (a < 0, abs(a))))
        ego = min(a for a in ids if a >= 0)
        self.stamps = tuple(sorted(p.stem for p in (path / str(ego)).glob("*.yaml")))
        if not self.stamps:
            raise DatasetError(f"{path / str(ego)}: no frame yaml files")

    def __len__(self) -> int:
        return len(self.stamps)

    def frame(self, index: int) -> SceneFrame:
        stamp = self.stamps[index]
        agents = {a: read_agent_frame(self.path / str(a), stamp, self.load_images) for a in self.agent_ids}
        ego = agents[min(a for a in agents if a >= 0)]
        default_time = index * 0.1
        path = self.path / str(ego.agent_id) / f"{stamp}.yaml"
        try:
            timestamp_s = float((_read_yaml(path).get(OUR_KEY) or {}).get("timestamp_s", default_time))
        except (TypeError, ValueError) as err:
            raise DatasetError(f"{path}: malformed value: {OUR_KEY}.timestamp_s: {err}") from err
        return SceneFrame(scenario=self.name, frame_index=int(stamp) if stamp.isdigit() else index,
                          timestamp_s=timestamp_s, agents=agents)


class OPV2VDataset:
    """All scenarios under ``root`` (or ``root`` itself when it is a scenario)."""

    def __init__(self, root: Path, load_images: bool = True) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: not a folder")
        if any(child.is_dir() and _is_int(child.name) for child in root.iterdir()):
            folders = [root]
        else:
            folders = [c for c in sorted(root.iterdir()) if c.is_dir()]
        if not folders:
            raise DatasetError(f"{root}: no scenario folders")
        self.scenarios = [Scenario(f, load_images) for f in folders]

    def __len__(self) -> int:
        return sum(len(s) for s in self.scenarios)

    def __iter__(self) -> Iterator[SceneFrame]:
        for scenario in self.scenarios:
            for index in range(len(scenario)):
                yield scenario.frame(index)


def _is_int(name: str) -> bool:
    """Whether a folder name is an agent id. Stricter than ``int()``, which takes
    "2021_08_16_22_26_54" (an OPV2V scenario name) for 20210816222654."""
    return re.fullmatch(r"-?[0-9]+", name) is not None
