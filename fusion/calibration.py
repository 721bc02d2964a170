"""Sensor calibration and pose uncertainty: validated camera and LiDAR models, and their wire form.

Frames follow ``protos/cpstream.proto``: the agent frame is x forward, y left, z up; a camera
frame is the OpenCV optical frame (x right, y down, z forward); ``a_from_b`` maps frame-b
coordinates into frame a. Everything is validated once, at the edge (a ``create`` constructor
or a proto decode), and refused with :class:`CalibrationError`; the models are frozen and their
arrays read-only, so the fusion node can trust them afterwards.

The noise helpers :func:`perturb_pose` and :func:`perturb_extrinsic` live in :mod:`models.geometry`
(the synthetic world uses them too) and are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely

from models.boxes import box_corners_3d
from models.geometry import invert_se3, perturb_extrinsic, perturb_pose, transform_points
from models.pose_filter import pose_covariance_sigma
from protos import CameraCalibration, LidarCalibration, Pose, SensorCalibration, Transform4x4
from transport import FramingError, pose_from_proto, pose_to_proto

__all__ = [
    "AgentCalibration",
    "CalibrationError",
    "CameraModel",
    "LidarModel",
    "PoseEstimate",
    "calibration_from_proto",
    "calibration_to_proto",
    "check_rigid",
    "perturb_extrinsic",
    "perturb_pose",
    "planar_sigma",
    "pose_estimate_from_proto",
    "pose_estimate_to_proto",
]

RIGID_TOLERANCE = 1e-3
"""How far ``R^T R`` may be from the identity (rounding of stored rotations is far below this)."""

MIN_DEPTH_M = 0.01
"""Points nearer than this in front of a camera count as behind it: they have no stable image."""

PRINCIPAL_POINT_MARGIN = 0.25
"""How far outside the image the principal point may lie, as a fraction of the image size."""

COVARIANCE_RELATIVE_TOLERANCE = 1e-6
"""Asymmetry and negative eigenvalues allowed in a covariance, relative to its largest entry."""

Matrix = np.ndarray | Sequence[Sequence[float]]


class CalibrationError(ValueError):
    """A calibration or pose that cannot be used; the message names the sensor and the defect."""


def _frozen(array: np.ndarray) -> np.ndarray:
    """A read-only float64 copy, so that frozen dataclasses holding it stay unchanged."""
    out = np.array(array, dtype=np.float64, copy=True)
    out.setflags(write=False)
    return out


def check_rigid(matrix: Matrix, what: str) -> np.ndarray:
    """Checks that ``matrix`` is a rigid transform.

    Args:
        matrix: A candidate [4, 4] transform.
        what: What it is, for the error message (e.g. ``"camera 'front' agent_from_camera"``).

    Returns:
        The matrix as a new float64 [4, 4] array.

    Raises:
        CalibrationError: Wrong shape, non-finite entries, a rotation that is not orthonormal
            within :data:`RIGID_TOLERANCE` (scaled or sheared), a reflection (det <= 0), or a last
            row other than (0, 0, 0, 1); the message starts with ``what``.
    """
    m = np.array(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise CalibrationError(f"{what} must be a 4x4 matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise CalibrationError(f"{what} is not finite (it has NaN or infinite entries)")
    rotation = m[:3, :3]
    error = float(np.abs(rotation.T @ rotation - np.eye(3)).max())
    if error > RIGID_TOLERANCE:
        raise CalibrationError(f"{what} is not a rigid transform: its rotation is not orthonormal "
                               f"(max |R^T R - I| = {error:.3g} > {RIGID_TOLERANCE:g}; scaled or sheared?)")
    det = float(np.linalg.det(rotation))
    if det <= 0.0:
        raise CalibrationError(f"{what} is not a rigid transform: its rotation is a reflection (det = {det:.3g})")
    if not np.allclose(m[3], (0.0, 0.0, 0.0, 1.0), rtol=0.0, atol=1e-9):
        raise CalibrationError(f"{what} is not a rigid transform: last row is {m[3].tolist()}, expected [0, 0, 0, 1]")
    return m


def _check_intrinsic(intrinsic: Matrix, what: str, width_px: int, height_px: int) -> np.ndarray:
    """Validates a pinhole matrix K (see :meth:`CameraModel.create`); returns it as float64."""
    k = np.array(intrinsic, dtype=np.float64)
    if k.shape != (3, 3):
        raise CalibrationError(f"{what}: intrinsic must be 3x3, got shape {k.shape}")
    if not np.all(np.isfinite(k)):
        raise CalibrationError(f"{what}: intrinsic is not finite")
    if k[0, 0] <= 0.0 or k[1, 1] <= 0.0:
        raise CalibrationError(f"{what}: focal lengths must be positive, got fx = {k[0, 0]:g} px, fy = {k[1, 1]:g} px")
    if k[1, 0] != 0.0 or not np.array_equal(k[2], (0.0, 0.0, 1.0)):
        raise CalibrationError(f"{what}: intrinsic must be (fx, s, cx; 0, fy, cy; 0, 0, 1), got rows "
                               f"2-3 {k[1:].tolist()}")
    for axis, centre_px, size_px in (("cx", k[0, 2], width_px), ("cy", k[1, 2], height_px)):
        margin_px = PRINCIPAL_POINT_MARGIN * size_px
        if not -margin_px <= centre_px <= size_px + margin_px:
            raise CalibrationError(f"{what}: principal point {axis} = {centre_px:g} px is far outside the "
                                   f"image (0..{size_px} px)")
    return k


@dataclass(frozen=True, slots=True)
class CameraModel:
    """A validated, undistorted pinhole camera on an agent.

    Build it with :meth:`create`, which checks every field; the constructor trusts its input.
    The image spans ``[0, width_px] x [0, height_px]`` in pixel coordinates (u right, v down).

    Attributes:
        name: Stable name of the camera on its agent, e.g. ``"camera0"``.
        width_px: Image width, pixels.
        height_px: Image height, pixels.
        intrinsic: K [3, 3], read-only, mapping camera-frame points to homogeneous pixels.
        agent_from_camera: [4, 4] read-only, pose of the OpenCV optical frame in the agent frame.
    """

    name: str
    width_px: int
    height_px: int
    intrinsic: np.ndarray  # [3, 3]
    agent_from_camera: np.ndarray  # [4, 4]

    @classmethod
    def create(cls, name: str, width_px: int, height_px: int, intrinsic: Matrix,
               agent_from_camera: Matrix) -> CameraModel:
        """Validates and builds a camera.

        Raises:
            CalibrationError: Empty name, non-positive image size, focal lengths not positive,
                K not of the form (fx, s, cx; 0, fy, cy; 0, 0, 1), a principal point more than
                :data:`PRINCIPAL_POINT_MARGIN` of the image size outside it, or an extrinsic
                that is not rigid. The message names the camera.
        """
        if not name:
            raise CalibrationError("a camera has an empty name")
        what = f"camera {name!r}"
        if int(width_px) <= 0 or int(height_px) <= 0:
            raise CalibrationError(f"{what}: image size {width_px}x{height_px} px must be positive")
        k = _check_intrinsic(intrinsic, what, int(width_px), int(height_px))
        extrinsic = check_rigid(agent_from_camera, f"{what} agent_from_camera")
        return cls(name, int(width_px), int(height_px), _frozen(k), _frozen(extrinsic))

    def project(self, points_agent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Projects agent-frame points into the image.

        Args:
            points_agent: [N, >=3] points in the agent frame (columns after xyz are ignored).

        Returns:
            ``(uv, depth_m)``: uv [N, 2] float64 pixel coordinates, NaN for points less than
            :data:`MIN_DEPTH_M` in front of the camera; depth_m [N], the distance along the
            optical axis (negative behind the camera).
        """
        points = np.atleast_2d(np.asarray(points_agent, dtype=np.float64))  # [N, C]
        points_camera = transform_points(invert_se3(self.agent_from_camera), points[:, :3])  # [N, 3]
        depth_m = points_camera[:, 2]  # [N]
        in_front = depth_m > MIN_DEPTH_M  # [N]
        pixels = points_camera[in_front] @ self.intrinsic.T  # [M, 3] homogeneous
        uv = np.full((points.shape[0], 2), np.nan)  # [N, 2]
        uv[in_front] = pixels[:, :2] / pixels[:, 2:3]
        return uv, depth_m

    def visible(self, uv: np.ndarray, depth_m: np.ndarray) -> np.ndarray:
        """Which projected points the camera sees (ignoring occlusion).

        Args:
            uv: [N, 2] pixels from :meth:`project`.
            depth_m: [N] depths from :meth:`project`.

        Returns:
            bool [N]: in front of the camera (depth > :data:`MIN_DEPTH_M`) and inside the image.
        """
        u, v = uv[:, 0], uv[:, 1]
        with np.errstate(invalid="ignore"):
            return (depth_m > MIN_DEPTH_M) & (u >= 0) & (u < self.width_px) & (v >= 0) & (v < self.height_px)

    def box_2d(self, box_agent: np.ndarray) -> np.ndarray | None:
        """The image-space box of a 3D box, the way annotation tools (nuScenes) derive 2D boxes.

        The box's corners that lie in front of the camera are projected, their convex hull is
        intersected with the image rectangle and its bounds are returned. Corners behind the
        camera are dropped rather than clipped at the camera plane, as the nuScenes devkit does
        (so this matches its 2D annotations; for an object that straddles the camera plane it
        under-covers the part between the dropped corners and the plane).

        Args:
            box_agent: [>=7] ``(x, y, z, l, w, h, yaw_rad)`` in the agent frame, z at the centre.

        Returns:
            float64 [4] ``(x1, y1, x2, y2)`` pixels, or None when nothing of it is in the image.
        """
        corners = box_corners_3d(np.asarray(box_agent, dtype=np.float64)[None, :7])[0]  # [8, 3]
        uv, depth_m = self.project(corners)
        uv = uv[depth_m > MIN_DEPTH_M]  # [K, 2]
        if uv.shape[0] == 0:
            return None
        hull = shapely.MultiPoint(uv).convex_hull
        in_image = hull.intersection(shapely.box(0.0, 0.0, self.width_px, self.height_px))
        if in_image.is_empty:
            return None
        return np.array(in_image.bounds, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class LidarModel:
    """A validated spinning LiDAR on an agent (build it with :meth:`create`).

    Attributes:
        agent_from_lidar: [4, 4] read-only, pose of the LiDAR frame in the agent frame.
        beams: Number of laser beams (vertical channels), >= 1.
        range_m: Maximum useful range, metres, > 0.
    """

    agent_from_lidar: np.ndarray  # [4, 4]
    beams: int
    range_m: float

    @classmethod
    def create(cls, agent_from_lidar: Matrix, beams: int, range_m: float) -> LidarModel:
        """Validates and builds a LiDAR.

        Raises:
            CalibrationError: A non-rigid extrinsic, no beams, or a range that is not positive.
        """
        extrinsic = check_rigid(agent_from_lidar, "lidar agent_from_lidar")
        if int(beams) < 1:
            raise CalibrationError(f"lidar: beams must be at least 1, got {beams}")
        if not (math.isfinite(range_m) and range_m > 0.0):
            raise CalibrationError(f"lidar: range_m must be positive, got {range_m}")
        return cls(_frozen(extrinsic), int(beams), float(range_m))


@dataclass(frozen=True, slots=True)
class AgentCalibration:
    """Every sensor of one agent (build it with :meth:`create`).

    Attributes:
        lidar: The LiDAR, or None on camera-only agents.
        cameras: The cameras in a stable order, names unique; empty on LiDAR-only agents.
    """

    lidar: LidarModel | None = None
    cameras: tuple[CameraModel, ...] = ()

    @classmethod
    def create(cls, lidar: LidarModel | None, cameras: Sequence[CameraModel]) -> AgentCalibration:
        """Builds the calibration; raises CalibrationError when two cameras share a name."""
        names = [camera.name for camera in cameras]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise CalibrationError(f"agent has more than one camera named {', '.join(map(repr, duplicates))}")
        return cls(lidar, tuple(cameras))

    @property
    def camera_names(self) -> tuple[str, ...]:
        """The camera names, in order."""
        return tuple(camera.name for camera in self.cameras)

    def camera(self, name: str) -> CameraModel:
        """The camera called ``name``; raises CalibrationError naming the cameras there are."""
        for camera in self.cameras:
            if camera.name == name:
                return camera
        raise CalibrationError(f"agent has no camera {name!r} (it has: {', '.join(self.camera_names) or 'none'})")


# ----------------------------------------------------------------------------- wire form

def _values(values: Sequence[float], count: int, field: str) -> np.ndarray:
    """A repeated-double field as float64 [count], refusing a wrong count or non-finite values."""
    if len(values) != count:
        raise CalibrationError(f"{field} has {len(values)} values, expected {count}")
    array = np.array(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise CalibrationError(f"{field} is not finite")
    return array


def _transform_to_proto(matrix: np.ndarray) -> Transform4x4:
    return Transform4x4(row_major=np.asarray(matrix, dtype=np.float64).ravel().tolist())


def _camera_from_proto(msg: CameraCalibration) -> CameraModel:
    what = f"camera {msg.name!r}"
    if not msg.HasField("agent_from_camera"):
        raise CalibrationError(f"{what}: agent_from_camera is missing")
    intrinsic = _values(msg.intrinsic, 9, f"{what}: intrinsic").reshape(3, 3)
    extrinsic = _values(msg.agent_from_camera.row_major, 16, f"{what}: agent_from_camera").reshape(4, 4)
    return CameraModel.create(msg.name, msg.width_px, msg.height_px, intrinsic, extrinsic)


def _lidar_from_proto(msg: LidarCalibration) -> LidarModel:
    if not msg.HasField("agent_from_lidar"):
        raise CalibrationError("lidar: agent_from_lidar is missing")
    extrinsic = _values(msg.agent_from_lidar.row_major, 16, "lidar: agent_from_lidar").reshape(4, 4)
    return LidarModel.create(extrinsic, msg.beams, msg.range_m)


def calibration_to_proto(calibration: AgentCalibration) -> SensorCalibration:
    """An agent's calibration as its wire message (exact: matrices travel as doubles)."""
    msg = SensorCalibration(cameras=[
        CameraCalibration(name=c.name, width_px=c.width_px, height_px=c.height_px,
                          intrinsic=c.intrinsic.ravel().tolist(),
                          agent_from_camera=_transform_to_proto(c.agent_from_camera))
        for c in calibration.cameras])
    if calibration.lidar is not None:
        lidar = calibration.lidar
        msg.lidar.CopyFrom(LidarCalibration(agent_from_lidar=_transform_to_proto(lidar.agent_from_lidar),
                                            beams=lidar.beams, range_m=lidar.range_m))
    return msg


def calibration_from_proto(msg: SensorCalibration, agent: str = "agent") -> AgentCalibration:
    """Decodes and validates a ``SensorCalibration``.

    Args:
        msg: The wire message.
        agent: Who sent it (e.g. ``"agent 3"``), to start error messages with.

    Raises:
        CalibrationError: Any field that :meth:`CameraModel.create`, :meth:`LidarModel.create` or
            :meth:`AgentCalibration.create` refuses, a missing transform, or a matrix field with
            the wrong number of values; the message names the agent, the sensor and the field.
    """
    try:
        lidar = _lidar_from_proto(msg.lidar) if msg.HasField("lidar") else None
        return AgentCalibration.create(lidar, [_camera_from_proto(c) for c in msg.cameras])
    except CalibrationError as err:
        raise CalibrationError(f"{agent}: {err}") from None


# ----------------------------------------------------------------------------- poses

def _check_covariance(covariance: Matrix, what: str) -> np.ndarray:
    """Validates a [6, 6] covariance: finite, symmetric and positive semi-definite within tolerance."""
    cov = np.array(covariance, dtype=np.float64)
    if cov.shape != (6, 6):
        raise CalibrationError(f"{what}: covariance must be 6x6, got shape {cov.shape}")
    if not np.all(np.isfinite(cov)):
        raise CalibrationError(f"{what}: covariance is not finite")
    tolerance = COVARIANCE_RELATIVE_TOLERANCE * float(np.abs(cov).max()) + 1e-15
    asymmetry = float(np.abs(cov - cov.T).max())
    if asymmetry > tolerance:
        raise CalibrationError(f"{what}: covariance is not symmetric (max |C - C^T| = {asymmetry:.3g})")
    smallest = float(np.linalg.eigvalsh(0.5 * (cov + cov.T)).min())
    if smallest < -tolerance:
        raise CalibrationError(f"{what}: covariance is not positive semi-definite (eigenvalue {smallest:.3g})")
    return cov


@dataclass(frozen=True, slots=True)
class PoseEstimate:
    """An agent's pose with its uncertainty (build it with :meth:`create`).

    Attributes:
        world_from_agent: [4, 4] read-only rigid transform.
        covariance: [6, 6] read-only covariance of (x_m, y_m, z_m, roll_rad, pitch_rad, yaw_rad)
            as in ``protos.Pose``, or None when unknown.
    """

    world_from_agent: np.ndarray  # [4, 4]
    covariance: np.ndarray | None = None  # [6, 6]

    @classmethod
    def create(cls, world_from_agent: Matrix, covariance: Matrix | None = None,
               what: str = "pose") -> PoseEstimate:
        """Validates and builds a pose; raises CalibrationError naming ``what`` and the defect."""
        pose = check_rigid(world_from_agent, what)
        cov = None if covariance is None else _frozen(_check_covariance(covariance, what))
        return cls(_frozen(pose), cov)


def pose_estimate_from_proto(msg: Pose, what: str = "pose") -> PoseEstimate:
    """Decodes a ``Pose``; its covariance must hold 36 values or none.

    Raises:
        CalibrationError: Non-finite values, or a covariance of the wrong size, not symmetric or
            not positive semi-definite; the message starts with ``what``.
    """
    try:
        world_from_agent = pose_from_proto(msg)
    except FramingError as err:
        raise CalibrationError(f"{what}: {err}") from None
    covariance = None
    if len(msg.covariance):
        covariance = _values(msg.covariance, 36, f"{what}: covariance").reshape(6, 6)
    return PoseEstimate.create(world_from_agent, covariance, what)


def pose_estimate_to_proto(estimate: PoseEstimate) -> Pose:
    """A pose estimate as its wire message (the covariance as 36 row-major values, or none)."""
    try:
        return pose_to_proto(estimate.world_from_agent, estimate.covariance)
    except FramingError as err:
        raise CalibrationError(str(err)) from None


def planar_sigma(covariance: np.ndarray) -> tuple[float, float]:
    """The ground-plane uncertainty of a pose covariance.

    Args:
        covariance: [6, 6] covariance of (x, y, z, roll, pitch, yaw), as in :class:`PoseEstimate`.

    Returns:
        ``(sigma_xy_m, sigma_yaw_rad)``: the standard deviation of the position along its least
        certain horizontal direction (the square root of the xy block's largest eigenvalue, so
        an isotropic ``sigma`` per axis gives ``sigma``) and of the heading.
    """
    sigma = pose_covariance_sigma(covariance)
    return sigma.xy_m, sigma.yaw_rad

