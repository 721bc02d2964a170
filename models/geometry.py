"""Rigid transforms between frames, in numpy float64.

Conventions used everywhere in cpstream:

* A transform is a 4x4 homogeneous matrix named by its frames: ``a_from_b`` maps
  coordinates expressed in frame ``b`` into frame ``a`` (``p_a = a_from_b @ p_b``),
  so transforms chain by matching names: ``world_from_lidar = world_from_ego @ ego_from_lidar``.
* Frames are right-handed; yaw is a rotation about +z, counter-clockwise seen from above.
* Boxes are ``[N, 7]`` arrays ``(x, y, z, l, w, h, yaw_rad)`` with ``(x, y, z)`` the box
  centre; any further columns (score, class, ...) are carried along untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "invert_se3",
    "matrix_to_opv2v_pose",
    "opv2v_pose_to_matrix",
    "se2_from_se3",
    "se3_from_xyz_rpy",
    "transform_boxes",
    "transform_points",
    "wrap_angle_rad",
    "yaw_from_matrix",
]


def wrap_angle_rad(angle_rad: float | np.ndarray) -> float | np.ndarray:
    """Wraps angles to the half-open interval (-pi, pi].

    Args:
        angle_rad: A scalar or an array of angles in radians.

    Returns:
        The wrapped angle(s), a Python float for scalar input, else an array of the same shape.
    """
    angle = np.asarray(angle_rad, dtype=np.float64)
    wrapped = math.pi - np.mod(math.pi - angle, 2.0 * math.pi)
    # np.mod may round up to exactly 2*pi, which would land on -pi (outside the interval).
    wrapped = np.where(wrapped <= -math.pi, wrapped + 2.0 * math.pi, wrapped)
    if wrapped.ndim == 0:
        return float(wrapped)
    return wrapped


def se3_from_xyz_rpy(
    x_m: float,
    y_m: float,
    z_m: float,
    roll_rad: float,
    pitch_rad: float,
    yaw_rad: float,
) -> np.ndarray:
    """Builds a 4x4 rigid transform from a translation and roll/pitch/yaw.

    The rotation is ``Rz(yaw) @ Ry(pitch) @ Rx(roll)`` (extrinsic x, then y, then z),
    right-handed.

    Args:
        x_m, y_m, z_m: Translation in metres (the child frame's origin in the parent frame).
        roll_rad, pitch_rad, yaw_rad: Rotation about x, y and z in radians.

    Returns:
        ``parent_from_child``, a float64 array of shape [4, 4].
    """
    cr, sr = math.cos(roll_rad), math.sin(roll_rad)
    cp, sp = math.cos(pitch_rad), math.sin(pitch_rad)
    cy, sy = math.cos(yaw_rad), math.sin(yaw_rad)
    return np.array(
        [
            [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr, x_m],
            [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr, y_m],
            [-sp, cp * sr, cp * cr, z_m],
            [0.0, 0.0, 0.0, 1.0],
        ],
        dtype=np.float64,
    )


def opv2v_pose_to_matrix(pose: Sequence[float]) -> np.ndarray:
    """Converts an OPV2V pose to the 4x4 transform the reference OPV2V loader builds.

    OPV2V stores poses as ``[x, y, z, roll, yaw, pitch]`` (note: yaw before pitch) in metres
    and degrees, taken from CARLA. This reproduces CARLA's ``Transform.get_matrix()``
    (OPV2V's ``x_to_world``) exactly, sign conventions included. It equals
    ``se3_from_xyz_rpy(x, y, z, -roll, -pitch, yaw)`` with angles in radians.

    Args:
        pose: ``[x_m, y_m, z_m, roll_deg, yaw_deg, pitch_deg]``.

    Returns:
        ``world_from_x`` (x being the posed sensor or vehicle), float64 [4, 4].
    """
    x_m, y_m, z_m, roll_deg, yaw_deg, pitch_deg = (float(v) for v in pose[:6])
    cr, sr = math.cos(math.radians(roll_deg)), math.sin(math.radians(roll_deg))
    cy, sy = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
    cp, sp = math.cos(math.radians(pitch_deg)), math.sin(math.radians(pitch_deg))
    return np.array(
        [
            [cp * cy, cy * sp * sr - sy * cr, -cy * sp * cr - sy * sr, x_m],
            [sy * cp, sy * sp * sr + cy * cr, -sy * sp * cr + cy * sr, y_m],
            [sp, -cp * sr, cp * cr, z_m],
            [0.0, 0.0, 0.0, 1.0],
        ],
        dtype=np.float64,
    )


def matrix_to_opv2v_pose(world_from_x: np.ndarray) -> list[float]:
    """Inverts :func:`opv2v_pose_to_matrix`.

    Exact for pitch in (-90, 90) degrees; at pitch = +-90 (gimbal lock) roll and yaw are
    not separable and an equivalent pair is returned.

    Args:
        world_from_x: A rigid transform, [4, 4].

    Returns:
        ``[x_m, y_m, z_m, roll_deg, yaw_deg, pitch_deg]`` with yaw and roll in (-180, 180].
    """
    m = np.asarray(world_from_x, dtype=np.float64)
    # From the matrix layout: m[2,0] = sin(p); m[1,0]/m[0,0] = tan(y); -m[2,1]/m[2,2] = tan(r).
    pitch_rad = math.asin(max(-1.0, min(1.0, m[2, 0])))
    yaw_rad = math.atan2(m[1, 0], m[0, 0])
    roll_rad = math.atan2(-m[2, 1], m[2, 2])
    return [
        float(m[0, 3]),
        float(m[1, 3]),
        float(m[2, 3]),
        math.degrees(wrap_angle_rad(roll_rad)),
        math.degrees(wrap_angle_rad(yaw_rad)),
        math.degrees(pitch_rad),
    ]


def invert_se3(a_from_b: np.ndarray) -> np.ndarray:
    """Inverts a rigid transform using the rotation's transpose.

    Args:
        a_from_b: A rigid transform, [4, 4].

    Returns:
        ``b_from_a``, float64 [4, 4].
    """
    m = np.asarray(a_from_b, dtype=np.float64)
    b_from_a = np.eye(4, dtype=np.float64)
    rotation_t = m[:3, :3].T
    b_from_a[:3, :3] = rotation_t
    b_from_a[:3, 3] = -rotation_t @ m[:3, 3]
    return b_from_a


def transform_points(a_from_b: np.ndarray, points_b: np.ndarray) -> np.ndarray:
    """Moves points from frame b to frame a.

    Args:
        a_from_b: A rigid transform, [4, 4].
        points_b: Points in frame b, [N, >=3]; columns after xyz (intensity, ...) are kept.
            N may be 0.

    Returns:
        A new float64 array of the input's shape with xyz in frame a.
    """
    m = np.asarray(a_from_b, dtype=np.float64)
    points_a = np.array(points_b, dtype=np.float64, copy=True)  # [N, C]
    points_a[:, :3] = points_a[:, :3] @ m[:3, :3].T + m[:3, 3]
    return points_a


def yaw_from_matrix(m: np.ndarray) -> float:
    """Returns the heading (rotation about z) of a 3x3 or 4x4 transform, in radians.

    Args:
        m: A rotation [3, 3] or transform [4, 4] (or a 2D transform [3, 3]).

    Returns:
        ``atan2(m[1, 0], m[0, 0])`` in (-pi, pi], the angle of the rotated x axis seen from
        above.
    """
    return math.atan2(float(m[1, 0]), float(m[0, 0]))


def se2_from_se3(m: np.ndarray) -> np.ndarray:
    """Projects a 3D rigid transform onto the ground plane.

    Keeps the xy translation and the yaw (see :func:`yaw_from_matrix`); drops z, roll and
    pitch. The result is an exact 2D rotation even when the 3D one is tilted.

    Args:
        m: A rigid transform ``a_from_b``, [4, 4].

    Returns:
        The planar transform ``a_from_b`` in homogeneous 2D form, float64 [3, 3].
    """
    yaw_rad = yaw_from_matrix(m)
    c, s = math.cos(yaw_rad), math.sin(yaw_rad)
    return np.array(
        [[c, -s, float(m[0, 3])], [s, c, float(m[1, 3])], [0.0, 0.0, 1.0]],
        dtype=np.float64,
    )


def transform_boxes(a_from_b: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Moves boxes from frame b to frame a.

    The centre is transformed as a point and the yaw of ``a_from_b`` is added to each box's
    yaw (boxes stay upright: roll and pitch of the transform only move the centre).

    Args:
        a_from_b: A rigid transform, [4, 4].
        boxes_b: Boxes in frame b, [N, >=7] ``(x, y, z, l, w, h, yaw_rad, ...)``; extra
            columns (score, class) are kept. N may be 0.

    Returns:
        A new float64 array of the input's shape; yaw wrapped to (-pi, pi].
    """
    boxes_a = transform_points(a_from_b, boxes_b)  # [N, C]
    boxes_a[:, 6] = wrap_angle_rad(boxes_a[:, 6] + yaw_from_matrix(a_from_b))
    return boxes_a


def planar(a_from_b: np.ndarray) -> np.ndarray:
    """The ground-plane part of a rigid transform as ``[4, 4]``: xy translation and yaw (see :func:`se2_from_se3`)."""
    m2 = se2_from_se3(a_from_b)
    out = np.eye(4)
    out[:2, :2], out[:2, 3] = m2[:2, :2], m2[:2, 2]
    return out


# Noise for benchmarks and the synthetic world: pure, drawing from the generator they are given.

def _turn_and_shift(a_from_b: np.ndarray, dx_m: float, dy_m: float, dyaw_rad: float) -> np.ndarray:
    """Turns frame b by ``dyaw_rad`` about a's z axis through b's own origin, then shifts it in a's xy."""
    out = np.array(a_from_b, dtype=np.float64, copy=True)
    c, s = math.cos(dyaw_rad), math.sin(dyaw_rad)
    out[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ out[:3, :3]
    out[0, 3] += dx_m
    out[1, 3] += dy_m
    return out


def perturb_pose(world_from_agent: np.ndarray, sigma_xy_m: float, sigma_yaw_deg: float,
                 rng: np.random.Generator) -> np.ndarray:
    """A pose with Gaussian localisation error, as per-frame noise for benchmarks.

    The heading error turns the agent about its own origin (not the world origin), so the
    position error is ``sigma_xy_m`` per axis wherever the agent is. Three normal draws are
    taken from ``rng`` every call, even with zero sigmas, so a seeded run stays aligned.

    Args:
        world_from_agent: [4, 4] rigid transform.
        sigma_xy_m: Standard deviation of the world x and y offsets, metres, >= 0.
        sigma_yaw_deg: Standard deviation of the heading error, degrees, >= 0.
        rng: Source of randomness.

    Returns:
        The perturbed ``world_from_agent``, a new float64 [4, 4] (the same pose for zero sigmas).
    """
    if sigma_xy_m < 0 or sigma_yaw_deg < 0:
        raise ValueError(f"noise sigmas must be >= 0, got {sigma_xy_m} m and {sigma_yaw_deg} deg")
    dx, dy, dyaw = rng.standard_normal(3) * (sigma_xy_m, sigma_xy_m, math.radians(sigma_yaw_deg))
    return _turn_and_shift(world_from_agent, float(dx), float(dy), float(dyaw))


def perturb_extrinsic(agent_from_sensor: np.ndarray, xy_m: float, yaw_deg: float,
                      rng: np.random.Generator) -> np.ndarray:
    """A sensor mount with a fixed-size error, as a mis-measured extrinsic for benchmarks.

    The error has exactly the given size: the sensor moves ``xy_m`` in the agent's xy plane in a
    uniformly random direction and turns by ``yaw_deg`` (random sign) about the agent z axis
    through its own origin. Draw it once per run and keep it: a mount error is a bias, not
    per-frame noise.

    Args:
        agent_from_sensor: [4, 4] rigid transform.
        xy_m: Size of the position error, metres, >= 0.
        yaw_deg: Size of the heading error, degrees, >= 0.
        rng: Source of randomness.

    Returns:
        The perturbed ``agent_from_sensor``, a new float64 [4, 4].
    """
    if xy_m < 0 or yaw_deg < 0:
        raise ValueError(f"mount error sizes must be >= 0, got {xy_m} m and {yaw_deg} deg")
    direction_rad = float(rng.uniform(0.0, 2.0 * math.pi))
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return _turn_and_shift(agent_from_sensor, xy_m * math.cos(direction_rad), xy_m * math.sin(direction_rad),
                           sign * math.radians(yaw_deg))
