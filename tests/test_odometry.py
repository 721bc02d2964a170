"""LiDAR odometry (open3d ICP, sweep onto sweep): its motion, and the detected vehicles it leaves out."""

from __future__ import annotations

import numpy as np

from agents.odometry import LidarOdometry, OdometryConfig


def _poles(rng: np.random.Generator) -> np.ndarray:
    """Static vertical poles (world frame): points on their surfaces up to 3 m."""
    centres = rng.uniform(-30, 30, size=(40, 2))
    angle = rng.uniform(0, 2 * np.pi, size=(40, 60))
    height = rng.uniform(0.5, 3.0, size=(40, 60))
    x = centres[:, :1] + 0.4 * np.cos(angle)
    y = centres[:, 1:] + 0.4 * np.sin(angle)
    return np.stack([x.ravel(), y.ravel(), height.ravel()], axis=1)


def _vehicle_beside(rng: np.random.Generator) -> np.ndarray:
    """A 4.5 m x 1.8 m vehicle centred 4 m to the agent's left (agent frame), densely hit on its four
    sides: it keeps pace with the agent."""
    n = 6000
    along = rng.uniform(-0.5, 0.5, n)  # position along a side, as a share of its length
    side = rng.integers(0, 4, n)  # right, left, rear, front
    x = np.where(side < 2, 4.5 * along, np.where(side == 2, -2.25, 2.25))
    y = 4.0 + np.where(side < 2, np.where(side == 0, -0.9, 0.9), 1.8 * along)
    return np.stack([x, y, rng.uniform(0.4, 1.5, n)], axis=1)


def test_odometry_leaves_out_detected_vehicles_that_drag_the_match() -> None:
    """The agent drives 0.8 m per sweep along x past static poles, with a vehicle keeping pace beside it.
    Matching the whole sweep, the vehicle pulls the estimated motion towards zero; leaving out the
    points in the detected box (what the agent's detector found), the motion comes out right."""
    rng = np.random.default_rng(3)
    poles = _poles(rng)
    vehicle = _vehicle_beside(rng)
    detection = np.array([[0.0, 4.0, 0.9, 4.5, 1.8, 1.6, 0.0, 0.9]])
    errors = {}
    for exclude in (False, True):
        odometry = LidarOdometry(OdometryConfig(enabled=True, exclude_detections=exclude, voxel_m=0.2))
        for k in range(6):
            own = poles - np.array([0.8 * k, 0.0, 0.0])  # the world seen from the agent at x = 0.8 k
            points = np.concatenate([own, vehicle]).astype(np.float32)
            step = odometry.step(points, detection)
        errors[exclude] = abs(step.odom_from_ground[0, 3] - 0.8 * 5)
    assert errors[True] < 0.05, errors
    assert errors[False] > 0.2, errors  # the test can fail: without leaving it out, the vehicle wins


def test_odometry_leaves_out_only_confident_detections() -> None:
    rng = np.random.default_rng(4)
    poles = _poles(rng)
    odometry = LidarOdometry(OdometryConfig(enabled=True, exclude_min_score=0.5, voxel_m=0.2))
    unsure = np.array([[0.0, 0.0, 1.0, 80.0, 80.0, 3.0, 0.0, 0.2]])  # covers everything, but score 0.2
    for k in range(3):
        step = odometry.step((poles - np.array([0.5 * k, 0.0, 0.0])).astype(np.float32), unsure)
    assert abs(step.odom_from_ground[0, 3] - 1.0) < 0.05
    assert step.fitness > 0.5
