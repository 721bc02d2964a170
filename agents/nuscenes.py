"""One nuScenes keyframe as mmdetection3d distributes it: an info pickle, the LiDAR sweep, six images.

What the data say (checked by ``tests/test_calibration.py``):

* ``instances[*].bbox_3d = [x, y, z, l, w, h, yaw]`` has ``z`` at the box's geometric centre,
  not its bottom face. Projecting the corners with ``z`` as the centre reproduces the annotated
  2D boxes (mean IoU 0.95 in the LiDAR frame, 0.99999 with the upright boxes in the global
  frame); taking ``z`` as the bottom gives a mean IoU of 0.34. The boxes' LiDAR point counts
  (``num_lidar_pts``) agree as well. That is already our convention (``models/boxes.py``:
  ``z`` is the centre), so the boxes are returned unchanged.
* The annotated boxes are upright in the global (map) frame, but the LiDAR frame is tilted about
  2 degrees from the vertical, so the pickle's yaw-only LiDAR-frame boxes are off by a pixel or
  two in the images. :attr:`NuScenesKeyframe.boxes_world` gives the exact upright boxes.
* ``lidar2cam`` includes the ego motion between the sweep and each camera's exposure (tens of
  centimetres at speed; the exposures spread over ~43 ms), ``cam2ego`` is the camera mount only.
  Project LiDAR-frame data with :attr:`NuScenesCamera.lidar_from_camera`.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from agents.opv2v import DatasetError
from models.geometry import invert_se3, transform_boxes, transform_points

__all__ = ["NuScenesCamera", "NuScenesKeyframe", "load_nuscenes_keyframe"]

POINT_COLUMNS = 5
"""x, y, z (metres, LiDAR frame), intensity, ring index: the ``.pcd.bin`` layout."""

_MATCH_TOLERANCE_M = 0.05
"""How close a camera annotation's 3D box must be to a LiDAR instance to be the same object."""

# The only globals the info pickle needs (numpy scalars and dtypes); anything else is refused.
_PICKLE_GLOBALS = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                   ("numpy", "dtype"), ("_codecs", "encode")}


@dataclass(frozen=True, slots=True)
class NuScenesCamera:
    """One camera of the keyframe, with its annotations.

    Attributes:
        name: ``CAM_FRONT``, ``CAM_FRONT_RIGHT``, ... as nuScenes names them.
        image_path: The JPEG.
        timestamp_s: Exposure time, seconds since the epoch.
        width_px: Image width, read from the JPEG.
        height_px: Image height, read from the JPEG.
        intrinsic: K [3, 3], pixels (images are undistorted).
        ego_from_camera: [4, 4] the camera (OpenCV optical frame) on the vehicle.
        lidar_from_camera: [4, 4] the camera at its exposure in the LiDAR frame at the sweep.
        boxes_2d: [M, 4] annotated image boxes ``(x1, y1, x2, y2)``, pixels.
        instance_index: int64 [M], for each 2D box the index of its object in
            :attr:`NuScenesKeyframe.boxes_lidar`, or -1 when none matches.
    """

    name: str
    image_path: Path
    timestamp_s: float
    width_px: int
    height_px: int
    intrinsic: np.ndarray  # [3, 3]
    ego_from_camera: np.ndarray  # [4, 4]
    lidar_from_camera: np.ndarray  # [4, 4]
    boxes_2d: np.ndarray  # [M, 4]
    instance_index: np.ndarray  # [M]


@dataclass(frozen=True, slots=True)
class NuScenesKeyframe:
    """One annotated nuScenes keyframe, as plain numpy data.

    Attributes:
        token: The nuScenes sample token.
        timestamp_s: The LiDAR sweep's time, seconds since the epoch.
        points_lidar: float32 [N, 5] ``(x, y, z, intensity, ring)`` in the LiDAR frame.
        boxes_lidar: float64 [K, 7] ``(x, y, z, l, w, h, yaw_rad)`` in the LiDAR frame, z at the
            box centre (our convention), upright in that frame (see the module docstring).
        labels: [K] class names (``"car"``, ``"pedestrian"``, ...; ``"ignored"`` for objects
            outside the ten detection classes).
        num_lidar_points: int64 [K] annotated LiDAR point count of each box.
        ego_from_lidar: [4, 4] the LiDAR on the vehicle.
        world_from_ego: [4, 4] the vehicle in the global frame at the sweep.
        cameras: The six cameras.
    """

    token: str
    timestamp_s: float
    points_lidar: np.ndarray  # [N, 5]
    boxes_lidar: np.ndarray  # [K, 7]
    labels: tuple[str, ...]
    num_lidar_points: np.ndarray  # [K]
    ego_from_lidar: np.ndarray  # [4, 4]
    world_from_ego: np.ndarray  # [4, 4]
    cameras: tuple[NuScenesCamera, ...]

    @property
    def world_from_lidar(self) -> np.ndarray:
        """[4, 4] the LiDAR in the global frame at the sweep."""
        return self.world_from_ego @ self.ego_from_lidar

    @property
    def boxes_world(self) -> np.ndarray:
        """float64 [K, 7] the boxes in the global frame, where they are upright (exact)."""
        return transform_boxes(self.world_from_lidar, self.boxes_lidar)

    def camera(self, name: str) -> NuScenesCamera:
        """The camera called ``name``; KeyError naming the cameras there are otherwise."""
        for camera in self.cameras:
            if camera.name == name:
                return camera
        raise KeyError(f"keyframe has no camera {name!r} (it has: {', '.join(c.name for c in self.cameras)})")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy scalars only, so a data file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_info(folder: Path) -> tuple[Path, dict[str, Any]]:
    """Finds the folder's one info pickle; returns its path and the whole dict."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder")
    found = sorted(folder.glob("*.pkl"))
    if len(found) != 1:
        raise DatasetError(f"{folder}: expected one info file *.pkl, found {len(found)}")
    try:
        with found[0].open("rb") as stream:
            return found[0], _NumpyOnlyUnpickler(stream).load()
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise DatasetError(f"{found[0]}: cannot read the info file ({err})") from err


def _existing(folder: Path, name: str) -> Path:
    """The data file ``name`` (looked up by its base name in ``folder``); DatasetError if absent."""
    path = folder / Path(name).name
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    return path


def _read_points(path: Path) -> np.ndarray:
    """A ``.pcd.bin`` sweep as float32 [N, 5]."""
    points = np.fromfile(path, dtype=np.float32)
    if points.size % POINT_COLUMNS:
        raise DatasetError(f"{path}: {points.size} floats is not a whole number of {POINT_COLUMNS}-value points")
    return points.reshape(-1, POINT_COLUMNS)


def _image_size(path: Path) -> tuple[int, int]:
    """(width_px, height_px) from the image header (the pixels are not decoded)."""
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as err:
        raise DatasetError(f"{path}: not a readable image ({err})") from err


def _match_instances(annotations: list[dict[str, Any]], boxes_lidar: np.ndarray,
                     camera_from_lidar: np.ndarray) -> np.ndarray:
    """For each camera annotation, the LiDAR instance with the same centre and size, or -1.

    The camera-frame ``bbox_3d`` is ``(x, y, z, l, h, w, yaw)`` (mmdetection3d's camera boxes),
    with the same centre point as the LiDAR box once moved by ``lidar2cam``.
    """
    centres_camera = transform_points(camera_from_lidar, boxes_lidar[:, :3])  # [K, 3]
    sizes_lhw = boxes_lidar[:, [3, 5, 4]]  # [K, 3]
    index = np.full(len(annotations), -1, dtype=np.int64)
    for m, annotation in enumerate(annotations):
        box = np.asarray(annotation["bbox_3d"], dtype=np.float64)  # [7]
        error_m = np.linalg.norm(centres_camera - box[:3], axis=1) + np.abs(sizes_lhw - box[3:6]).max(axis=1)
        if error_m.size and error_m.min() <= _MATCH_TOLERANCE_M:
            index[m] = int(error_m.argmin())
    return index


def _camera(folder: Path, name: str, info: dict[str, Any], annotations: list[dict[str, Any]],
            boxes_lidar: np.ndarray) -> NuScenesCamera:
    """One camera's calibration and annotations."""
    image_path = _existing(folder, info["img_path"])
    width_px, height_px = _image_size(image_path)
    camera_from_lidar = np.asarray(info["lidar2cam"], dtype=np.float64)
    boxes_2d = np.asarray([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
    return NuScenesCamera(
        name=name, image_path=image_path, timestamp_s=float(info["timestamp"]), width_px=width_px,
        height_px=height_px, intrinsic=np.asarray(info["cam2img"], dtype=np.float64).reshape(3, 3),
        ego_from_camera=np.asarray(info["cam2ego"], dtype=np.float64).reshape(4, 4),
        lidar_from_camera=invert_se3(camera_from_lidar), boxes_2d=boxes_2d,
        instance_index=_match_instances(annotations, boxes_lidar, camera_from_lidar))


def _keyframe(folder: Path, sample: dict[str, Any], categories: dict[str, int]) -> NuScenesKeyframe:
    """Builds the keyframe from the pickle's ``data_list[0]``."""
    names = {index: name for name, index in categories.items()}
    instances = sample["instances"]
    boxes_lidar = np.asarray([i["bbox_3d"] for i in instances], dtype=np.float64).reshape(-1, 7)
    cam_instances = sample.get("cam_instances", {})
    cameras = tuple(_camera(folder, name, info, cam_instances.get(name, []), boxes_lidar)
                    for name, info in sample["images"].items())
    return NuScenesKeyframe(
        token=str(sample["token"]), timestamp_s=float(sample["timestamp"]),
        points_lidar=_read_points(_existing(folder, sample["lidar_points"]["lidar_path"])),
        boxes_lidar=boxes_lidar, labels=tuple(names.get(int(i["bbox_label_3d"]), "ignored") for i in instances),
        num_lidar_points=np.asarray([i["num_lidar_pts"] for i in instances], dtype=np.int64),
        ego_from_lidar=np.asarray(sample["lidar_points"]["lidar2ego"], dtype=np.float64).reshape(4, 4),
        world_from_ego=np.asarray(sample["ego2global"], dtype=np.float64).reshape(4, 4), cameras=cameras)


def load_nuscenes_keyframe(folder: Path) -> NuScenesKeyframe:
    """Loads the keyframe in ``folder`` (mmdetection3d's nuScenes info layout, v2).

    The folder holds one ``*.pkl`` info file whose ``data_list[0]`` is the keyframe, and the
    sweep and images it names (looked up by base name in ``folder``). The pickle is read with
    an unpickler that accepts numpy scalars only.

    Args:
        folder: e.g. ``shared/data/real/nuscenes``.

    Returns:
        The keyframe; boxes in our convention (``z`` at the centre), see the module docstring.

    Raises:
        DatasetError: A missing folder, info file, sweep or image, or a malformed one; the
            message names the file.
    """
    folder = Path(folder)
    path, content = _load_info(folder)
    try:
        return _keyframe(folder, content["data_list"][0], content["metainfo"]["categories"])
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise DatasetError(f"{path}: malformed info file ({type(err).__name__}: {err})") from err
