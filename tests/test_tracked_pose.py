"""An agent's tracked pose (agents.pose.TrackedPose) and the planar filter under it (models.pose_filter)."""

from __future__ import annotations

import numpy as np
import pytest

from agents.pose import CorrectionRefused, PoseCorrectionConfig, TrackedPose
from models.geometry import invert_se3
from models.pose_filter import (FilterConfig, PlanarSigma, PoseFilter, orthonormal, planar_error,
                                planar_to_pose_covariance, pose_covariance_sigma, pose_to_planar_covariance)

GNSS = PlanarSigma(0.6, np.deg2rad(0.6))
ODOMETRY = PlanarSigma(0.03, np.deg2rad(0.03))
PRECISE = np.diag([0.02 ** 2, 0.02 ** 2, np.deg2rad(0.02) ** 2])
FRAME_IN_OWN = np.array([[1.0, 0.0, 0.0, 0.4], [0.0, 1.0, 0.0, -0.3], [0.0, 0.0, 1.0, -1.8], [0.0, 0.0, 0.0, 1.0]])
"""The frame an agent sends (e.g. its BEV frame), in its own: fixed here."""


def _pose(x: float, y: float, yaw: float, z: float = 1.8) -> np.ndarray:
    out = np.eye(4)
    out[:2, :2] = [[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]]
    out[:3, 3] = (x, y, z)
    return out


def _truth(k: int) -> np.ndarray:
    """A drive along a bend, 0.8 m and 1.1 degrees per frame."""
    return _pose(100.0 + 8.0 * np.sin(0.02 * k) / 0.02 * 0.1, 50.0 + 0.8 * k, 0.3 + 0.02 * k)


def _error(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    d = planar_error(estimate, truth)
    return float(np.hypot(d[0], d[1])), float(np.degrees(abs(d[2])))


def _drive(pose: TrackedPose, frames: int, estimates: bool, seed: int = 0, gnss: PlanarSigma = GNSS) -> list:
    """Report ``frames`` frames (GNSS drawn with ``gnss``, exact odometry); with ``estimates`` the node sends back
    the true pose of each frame, which reaches the agent before the next one. Errors of the reported poses."""
    rng = np.random.default_rng(seed)
    odom_from_world = _pose(3.0, -4.0, 1.0, 0.0) @ invert_se3(_truth(0))
    errors = []
    for k in range(frames):
        truth = _truth(k)
        noise = rng.standard_normal(3) * (gnss.xy_m, gnss.xy_m, gnss.yaw_rad)
        own = _pose(truth[0, 3] + noise[0], truth[1, 3] + noise[1], 0.3 + 0.02 * k + noise[2])
        reported, sigma, _ = pose.report(k, own, gnss, odom_from_world @ truth, ODOMETRY)
        frame = reported @ FRAME_IN_OWN
        pose.remember_frame(k, frame, reported)
        errors.append((*_error(reported, truth), sigma))
        if estimates:
            pose.on_correction(k, truth @ FRAME_IN_OWN, PRECISE)
    return errors


def test_the_node_s_estimates_carried_by_odometry_beat_the_gnss_alone() -> None:
    alone = _drive(TrackedPose(PoseCorrectionConfig()), 60, estimates=False)
    helped_pose = TrackedPose(PoseCorrectionConfig())
    helped = _drive(helped_pose, 60, estimates=True)
    late_alone = np.median([e[0] for e in alone[20:]])
    late_helped = np.median([e[0] for e in helped[20:]])
    assert late_helped < 0.05 and max(e[1] for e in helped[20:]) < 0.05, helped[20:25]
    assert late_alone > 3 * late_helped  # GNSS and odometry alone: about 0.15 m here
    assert helped_pose.applied == 59 and helped_pose.refused == 0 and helped_pose.sequence == 58
    assert helped[-1][2].xy_m < 0.05  # the reported uncertainty follows the estimates


def test_an_exact_gnss_pose_is_reported_exactly() -> None:
    errors = _drive(TrackedPose(PoseCorrectionConfig()), 10, estimates=True, gnss=PlanarSigma(0.0, 0.0))
    assert max(e[0] for e in errors) < 1e-9 and max(e[1] for e in errors) < 1e-9


@pytest.mark.parametrize("covariance, why", [
    (np.full((3, 3), np.nan), "no valid 3x3 covariance"),
    (np.eye(4), "no valid 3x3 covariance"),
    (np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), "no valid 3x3 covariance"),
    (-np.eye(3), "no valid 3x3 covariance"),
])
def test_an_estimate_with_a_bad_covariance_is_refused_and_counted(covariance, why) -> None:
    pose = TrackedPose(PoseCorrectionConfig())
    _drive(pose, 3, estimates=False)
    with pytest.raises(CorrectionRefused, match=why):
        pose.on_correction(2, _truth(2) @ FRAME_IN_OWN, covariance)
    assert pose.refused == 1 and why in pose.last_error


def test_unknown_far_or_unwanted_estimates_are_refused_and_counted_and_lose_nothing_else() -> None:
    pose = TrackedPose(PoseCorrectionConfig(max_shift_m=2.0, max_turn_deg=2.0))
    _drive(pose, 3, estimates=False)
    with pytest.raises(CorrectionRefused, match="no longer remembers"):
        pose.on_correction(7, _truth(2) @ FRAME_IN_OWN, PRECISE)
    pose.on_correction(2, _pose(5.0, 0.0, 0.0, 0.0) @ _truth(2) @ FRAME_IN_OWN, PRECISE)  # 5 m off: refused when used
    reported, _, carried = pose.report(3, _truth(3), GNSS, _pose(3.0, -4.0, 1.0, 0.0) @ invert_se3(_truth(0)) @ _truth(3),
                                       ODOMETRY)
    assert pose.refused == 2 and "exceeds the bound of 2.0 m" in pose.last_error and carried == 0
    assert _error(reported, _truth(3))[0] < 1.0  # reported from its GNSS and odometry as before, not moved 5 m
    off = TrackedPose(PoseCorrectionConfig(apply=False))
    _drive(off, 2, estimates=False)
    with pytest.raises(CorrectionRefused, match="switched off"):
        off.on_correction(1, _truth(1) @ FRAME_IN_OWN, PRECISE)
    assert off.refused == 1


def test_an_estimate_for_a_frame_without_odometry_is_refused() -> None:
    pose = TrackedPose(PoseCorrectionConfig())
    reported, _, _ = pose.report(0, _truth(0), GNSS, None, None)
    pose.remember_frame(0, reported @ FRAME_IN_OWN, reported)
    with pytest.raises(CorrectionRefused, match="no odometry"):
        pose.on_correction(0, _truth(0) @ FRAME_IN_OWN, PRECISE)


def test_a_filter_refuses_a_disagreeing_fix_only_when_gated_and_restarts_on_a_better_one() -> None:
    f = PoseFilter(FilterConfig())
    assert f.fold(np.eye(4), PRECISE) is None  # no frame yet
    f.update(0, _pose(0.0, 0.0, 0.0), GNSS, None, None)
    far = _pose(10.0, 0.0, 0.0)
    assert f.fold(far, PRECISE) is None
    assert f.fold(far, PRECISE, gate=False).world_from_agent[0, 3] > 9.0
    restarted = f.restart(_pose(1.0, 2.0, 0.1), PRECISE)
    assert _error(restarted.world_from_agent, _pose(1.0, 2.0, 0.1)) == (0.0, 0.0)
    assert np.allclose(f.covariance, PRECISE)


def test_orthonormal_removes_a_rotation_s_drift_and_covariances_convert_both_ways() -> None:
    drifted = _pose(1.0, 2.0, 0.7)
    drifted[:3, :3] *= 1.01
    fixed = orthonormal(drifted)
    assert np.allclose(fixed[:3, :3] @ fixed[:3, :3].T, np.eye(3)) and np.allclose(fixed[:3, 3], drifted[:3, 3])
    assert _error(fixed, _pose(1.0, 2.0, 0.7))[1] < 1e-9
    planar = np.array([[0.04, 0.01, 0.001], [0.01, 0.09, 0.0], [0.001, 0.0, 0.0004]])
    full = planar_to_pose_covariance(planar)
    assert np.allclose(pose_to_planar_covariance(full), planar) and full[2, 2] == 0.0
    sigma = pose_covariance_sigma(planar_to_pose_covariance(np.diag([0.25, 0.25, 0.0001])))
    assert sigma.xy_m == pytest.approx(0.5) and sigma.yaw_rad == pytest.approx(0.01)


def test_of_several_estimates_waiting_the_newest_usable_one_is_taken() -> None:
    pose = TrackedPose(PoseCorrectionConfig(max_shift_m=2.0))
    _drive(pose, 3, estimates=False)
    pose.on_correction(1, _truth(1) @ FRAME_IN_OWN, PRECISE)
    pose.on_correction(2, _pose(5.0, 0.0, 0.0, 0.0) @ _truth(2) @ FRAME_IN_OWN, PRECISE)  # 5 m off: refused
    odom = _pose(3.0, -4.0, 1.0, 0.0) @ invert_se3(_truth(0)) @ _truth(3)
    reported, _, carried = pose.report(3, _truth(3), GNSS, odom, ODOMETRY)
    assert (pose.applied, pose.refused, carried) == (1, 1, 1)  # frame 2's refused, frame 1's taken
    assert _error(reported, _truth(3))[0] < 0.05
