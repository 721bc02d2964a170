"""Planar pose maths shared by agents and the fusion node: a pose's uncertainty, a correction of it, and a
Kalman filter of one pose over time (odometry between frames, absolute fixes at them).

Poses here are 4x4 rigid transforms whose planar part (x, y, heading) is what is estimated; the error
of an estimate is a shift of its origin (world axes) and a turn about that origin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from models.geometry import invert_se3, wrap_angle_rad

CHI2_3DOF_999 = 16.27
"""99.9 % quantile of chi-square with 3 degrees of freedom: the consistency gate of a fix."""
QUARTER_TURN = np.array([[0.0, -1.0], [1.0, 0.0]])
"""d(R p)/d(theta) = QUARTER_TURN R p."""


@dataclass(frozen=True, slots=True)
class PlanarSigma:
    """Standard deviations of a pose's planar part."""

    xy_m: float
    yaw_rad: float


def orthonormal(a_from_b: np.ndarray) -> np.ndarray:
    """``a_from_b`` with its rotation made exactly orthonormal again (the nearest rotation): poses chained
    through inverses and corrections frame after frame would otherwise grow their rounding errors."""
    out = np.array(a_from_b, dtype=np.float64, copy=True)
    u, _, vt = np.linalg.svd(out[:3, :3])
    out[:3, :3] = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
    return out


def correction_matrix(delta: np.ndarray, origin_xy: np.ndarray) -> np.ndarray:
    """``[4, 4]`` that turns by ``delta[2]`` about ``origin_xy`` and then moves by ``delta[:2]``."""
    c, s = np.cos(delta[2]), np.sin(delta[2])
    out = np.eye(4)
    out[:2, :2] = [[c, -s], [s, c]]
    out[:2, 3] = origin_xy + delta[:2] - out[:2, :2] @ origin_xy
    return out


class FilterConfig(BaseModel):
    """How the fusion node filters each agent's reported pose with its odometry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    max_gap_frames: int = Field(20, ge=1)
    """A gap of more sequences than this since the agent's last frame restarts its filter."""


@dataclass(frozen=True, slots=True)
class FilteredPose:
    """An agent's pose after filtering, and its uncertainty."""

    world_from_agent: np.ndarray  # [4, 4]
    sigma: PlanarSigma


def planar_error(target: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """``[3]``: the shift of the origin (world axes) and the turn about it that move ``estimate`` onto ``target``."""
    turn = np.arctan2(target[1, 0], target[0, 0]) - np.arctan2(estimate[1, 0], estimate[0, 0])
    return np.array([target[0, 3] - estimate[0, 3], target[1, 3] - estimate[1, 3], wrap_angle_rad(turn)])


class PoseFilter:
    """A Kalman filter of one agent's planar pose: predicted with its odometry, updated with its reported pose.

    Reported poses (GNSS/INS) are absolute but noisy frame to frame; odometry (scan matching) is
    precise frame to frame but drifts. Together they are better than either. The state error is
    a shift of the agent's origin (world axes) and a turn about it. Frames must come in sequence
    order; an older frame than the last one is answered from the recent estimates (or as reported).
    """

    def __init__(self, config: FilterConfig) -> None:
        self.config = config
        self._sequence: int | None = None
        self._estimate = np.eye(4)
        self._covariance = np.zeros((3, 3))
        self._odom_from_agent = np.eye(4)
        self._recent: dict[int, FilteredPose] = {}

    def reset(self) -> None:
        self._sequence = None
        self._recent.clear()

    def update(self, sequence: int, world_from_agent: np.ndarray, sigma: PlanarSigma,
               odom_from_agent: np.ndarray | None, odometry_sigma: PlanarSigma | None) -> FilteredPose:
        """The filtered pose of frame ``sequence`` (``world_from_agent`` as reported, with ``sigma``)."""
        measured = np.diag([sigma.xy_m ** 2, sigma.xy_m ** 2, sigma.yaw_rad ** 2])
        if sequence in self._recent:
            return self._recent[sequence]
        if self._sequence is not None and sequence < self._sequence:
            return FilteredPose(world_from_agent, sigma)
        gap = None if self._sequence is None else sequence - self._sequence
        if (not self.config.enabled or odom_from_agent is None or odometry_sigma is None or gap is None
                or gap > self.config.max_gap_frames):
            self._estimate, self._covariance = world_from_agent.copy(), measured
        else:
            self._predict(odom_from_agent, odometry_sigma, gap)
            self._correct(world_from_agent, measured)
        self._sequence = sequence
        if odom_from_agent is not None:
            self._odom_from_agent = odom_from_agent
        result = self._result()
        self._recent[sequence] = result
        while len(self._recent) > 32:
            del self._recent[min(self._recent)]
        return result

    @property
    def covariance(self) -> np.ndarray:
        """``[3, 3]`` of the newest estimate's error (x, y, heading)."""
        return self._covariance.copy()

    def fold(self, world_from_agent: np.ndarray, covariance: np.ndarray, gate: bool = True) -> FilteredPose | None:
        """Fold another fix of the newest frame's pose (``covariance`` ``[3, 3]``) into its estimate; returns the
        new estimate, or None (nothing changed) when no frame came yet or, with ``gate``, the fix disagrees with
        it beyond both covariances (chi-square, 3 degrees of freedom, 99.9 %)."""
        if self._sequence is None:
            return None
        innovation = planar_error(world_from_agent, self._estimate)
        total = self._covariance + covariance + 1e-12 * np.eye(3)
        if gate and float(innovation @ np.linalg.solve(total, innovation)) > CHI2_3DOF_999:
            return None
        self._correct(world_from_agent, covariance)
        self._recent[self._sequence] = self._result()
        return self._recent[self._sequence]

    def restart(self, world_from_agent: np.ndarray, covariance: np.ndarray) -> FilteredPose | None:
        """Replace the newest frame's estimate by a better one (``covariance`` ``[3, 3]``) that already holds what
        this filter knew; returns it (None when no frame came yet)."""
        if self._sequence is None:
            return None
        self._estimate, self._covariance = world_from_agent.copy(), np.array(covariance, dtype=np.float64)
        self._recent[self._sequence] = self._result()
        return self._recent[self._sequence]

    def _result(self) -> FilteredPose:
        self._estimate = orthonormal(self._estimate)
        cov = self._covariance
        return FilteredPose(self._estimate.copy(), PlanarSigma(float(np.sqrt(max(cov[0, 0] + cov[1, 1], 0.0) / 2)),
                                                               float(np.sqrt(max(cov[2, 2], 0.0)))))

    def _predict(self, odom_from_agent: np.ndarray, step: PlanarSigma, gap: int) -> None:
        motion = invert_se3(self._odom_from_agent) @ odom_from_agent  # previous frame from this one
        predicted = self._estimate @ motion
        lever = predicted[:2, 3] - self._estimate[:2, 3]
        jacobian = np.eye(3)
        jacobian[:2, 2] = QUARTER_TURN @ lever  # a turn at the previous frame swings this one's origin
        noise = gap * np.diag([step.xy_m ** 2, step.xy_m ** 2, step.yaw_rad ** 2])
        self._estimate = predicted
        self._covariance = jacobian @ self._covariance @ jacobian.T + noise

    def _correct(self, world_from_agent: np.ndarray, measured: np.ndarray) -> None:
        if not np.any(measured):  # an exact fix: taken as it is (a gain of one would leave rounding behind)
            self._estimate, self._covariance = world_from_agent.copy(), np.zeros((3, 3))
            return
        innovation = planar_error(world_from_agent, self._estimate)
        total = self._covariance + measured + 1e-12 * np.eye(3)
        gain = self._covariance @ np.linalg.inv(total)
        delta = gain @ innovation
        self._estimate = correction_matrix(delta, self._estimate[:2, 3]) @ self._estimate
        self._covariance = (np.eye(3) - gain) @ self._covariance


_PLANAR = [0, 1, 5]
"""Where x, y and heading sit in a ``Pose.covariance`` (x, y, z, roll, pitch, yaw)."""


def planar_to_pose_covariance(covariance: np.ndarray) -> np.ndarray:
    """``[3, 3]`` of (x, y, heading) -> ``[6, 6]`` of (x, y, z, roll, pitch, yaw), the other parts zero."""
    out = np.zeros((6, 6))
    out[np.ix_(_PLANAR, _PLANAR)] = covariance
    return out


def pose_to_planar_covariance(covariance: np.ndarray) -> np.ndarray:
    """``[6, 6]`` of (x, y, z, roll, pitch, yaw) -> ``[3, 3]`` of (x, y, heading)."""
    return np.asarray(covariance, dtype=np.float64)[np.ix_(_PLANAR, _PLANAR)].copy()


def sigma_covariance(sigma: PlanarSigma) -> np.ndarray:
    """``[3, 3]`` of independent x, y (each ``sigma.xy_m``) and heading errors."""
    return np.diag([sigma.xy_m ** 2, sigma.xy_m ** 2, sigma.yaw_rad ** 2])


def pose_covariance_sigma(covariance: np.ndarray) -> PlanarSigma:
    """The ground-plane uncertainty of a ``[6, 6]`` pose covariance (x, y, z, roll, pitch, yaw): the standard
    deviation of the position along its least certain horizontal direction (the square root of the xy
    block's largest eigenvalue, so an isotropic ``sigma`` per axis gives ``sigma``) and of the heading."""
    cov = np.asarray(covariance, dtype=np.float64)
    largest_xy = float(np.linalg.eigvalsh(cov[:2, :2]).max())
    return PlanarSigma(float(np.sqrt(max(largest_xy, 0.0))), float(np.sqrt(max(float(cov[5, 5]), 0.0))))
