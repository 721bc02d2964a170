"""Golden tests for models.geometry and models.boxes, checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.boxes import (
    bev_iou_matrix,
    box_corners_3d,
    box_corners_bev,
    count_points_in_boxes,
    points_in_boxes,
)
from models.geometry import (
    invert_se3,
    matrix_to_opv2v_pose,
    opv2v_pose_to_matrix,
    se2_from_se3,
    se3_from_xyz_rpy,
    transform_boxes,
    transform_points,
    wrap_angle_rad,
    yaw_from_matrix,
)

HALF_PI = math.pi / 2


# --- transforms -------------------------------------------------------------------------------


def test_identity_transform_keeps_points_and_extra_columns() -> None:
    points = np.array([[1.0, 2.0, 3.0, 0.5], [-4.0, 0.0, 1.0, 0.9]])  # [2, 4]
    moved = transform_points(np.eye(4), points)
    np.testing.assert_allclose(moved, points)
    assert moved is not points


def test_yaw_90_rotation_and_translation_of_points() -> None:
    # Rz(90): (x, y, z) -> (-y, x, z); then + (10, 20, 30). Intensity untouched.
    world_from_agent = se3_from_xyz_rpy(10.0, 20.0, 30.0, 0.0, 0.0, HALF_PI)
    points_agent = np.array([[1.0, 0.0, 0.0, 7.0], [0.0, 2.0, 1.0, 8.0]])
    points_world = transform_points(world_from_agent, points_agent)
    np.testing.assert_allclose(points_world, [[10.0, 21.0, 30.0, 7.0], [8.0, 20.0, 31.0, 8.0]])
    np.testing.assert_allclose(points_agent[:, :3], [[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]])


def test_pure_translation() -> None:
    world_from_agent = se3_from_xyz_rpy(1.0, -2.0, 0.5, 0.0, 0.0, 0.0)
    moved = transform_points(world_from_agent, [[0.0, 0.0, 0.0]])
    np.testing.assert_allclose(moved, [[1.0, -2.0, 0.5]])


def test_transform_points_accepts_no_points() -> None:
    assert transform_points(np.eye(4), np.zeros((0, 4))).shape == (0, 4)


def test_roll_and_pitch_follow_right_hand_rule() -> None:
    # Roll +90 about x: y -> z. Pitch +90 about y: z -> x.
    roll = se3_from_xyz_rpy(0, 0, 0, HALF_PI, 0, 0)
    pitch = se3_from_xyz_rpy(0, 0, 0, 0, HALF_PI, 0)
    np.testing.assert_allclose(transform_points(roll, [[0, 1, 0]]), [[0, 0, 1]], atol=1e-12)
    np.testing.assert_allclose(transform_points(pitch, [[0, 0, 1]]), [[1, 0, 0]], atol=1e-12)


def test_invert_se3_is_the_inverse() -> None:
    a_from_b = se3_from_xyz_rpy(3.0, -1.0, 2.0, 0.3, -0.2, 2.5)
    np.testing.assert_allclose(invert_se3(a_from_b) @ a_from_b, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(a_from_b @ invert_se3(a_from_b), np.eye(4), atol=1e-12)


def test_yaw_and_se2_projection() -> None:
    m = se3_from_xyz_rpy(4.0, 5.0, 6.0, 0.1, 0.2, 0.7)
    assert yaw_from_matrix(m) == pytest.approx(0.7)
    c, s = math.cos(0.7), math.sin(0.7)
    np.testing.assert_allclose(se2_from_se3(m), [[c, -s, 4.0], [s, c, 5.0], [0, 0, 1]])


@pytest.mark.parametrize(
    ("angle_rad", "expected_rad"),
    [
        (0.0, 0.0),
        (math.pi, math.pi),
        (-math.pi, math.pi),
        (3 * math.pi, math.pi),
        (4.0, 4.0 - 2 * math.pi),
        (-4.0, 2 * math.pi - 4.0),
    ],
)
def test_wrap_angle(angle_rad: float, expected_rad: float) -> None:
    assert wrap_angle_rad(angle_rad) == pytest.approx(expected_rad)


def test_wrap_angle_array() -> None:
    np.testing.assert_allclose(wrap_angle_rad(np.array([0.5, 7.0])), [0.5, 7.0 - 2 * math.pi])


# --- OPV2V poses ------------------------------------------------------------------------------


def test_opv2v_yaw_90_maps_x_axis_to_y() -> None:
    world_from_lidar = opv2v_pose_to_matrix([1.0, 2.0, 3.0, 0.0, 90.0, 0.0])
    np.testing.assert_allclose(world_from_lidar[:3, 0], [0.0, 1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(world_from_lidar[:3, 3], [1.0, 2.0, 3.0])
    moved = transform_points(world_from_lidar, [[1.0, 0.0, 0.0]])
    np.testing.assert_allclose(moved, [[1.0, 3.0, 3.0]], atol=1e-12)


def test_opv2v_matches_carla_formula_and_negated_roll_pitch() -> None:
    x, y, z, roll, yaw, pitch = 5.0, -3.0, 1.5, 10.0, 30.0, -20.0
    cr, sr = math.cos(math.radians(roll)), math.sin(math.radians(roll))
    cy, sy = math.cos(math.radians(yaw)), math.sin(math.radians(yaw))
    cp, sp = math.cos(math.radians(pitch)), math.sin(math.radians(pitch))
    carla = np.array(
        [
            [cp * cy, cy * sp * sr - sy * cr, -cy * sp * cr - sy * sr, x],
            [sy * cp, sy * sp * sr + cy * cr, -sy * sp * cr + cy * sr, y],
            [sp, -cp * sr, cp * cr, z],
            [0, 0, 0, 1],
        ]
    )
    m = opv2v_pose_to_matrix([x, y, z, roll, yaw, pitch])
    np.testing.assert_allclose(m, carla)
    rpy = se3_from_xyz_rpy(x, y, z, -math.radians(roll), -math.radians(pitch), math.radians(yaw))
    np.testing.assert_allclose(m, rpy, atol=1e-12)


def test_opv2v_pose_round_trip() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        pose = [
            *rng.uniform(-100.0, 100.0, 3),
            rng.uniform(-80.0, 80.0),  # roll
            -rng.uniform(-180.0, 180.0),  # yaw in [-180, 180) negated -> (-180, 180]
            rng.uniform(-80.0, 80.0),  # pitch
        ]
        round_trip = matrix_to_opv2v_pose(opv2v_pose_to_matrix(pose))
        np.testing.assert_allclose(round_trip, pose, atol=1e-9)


def test_opv2v_yaw_180_round_trips_to_180() -> None:
    pose = matrix_to_opv2v_pose(opv2v_pose_to_matrix([0, 0, 0, 0, 180.0, 0]))
    assert pose[4] == pytest.approx(180.0)


# --- box transforms ---------------------------------------------------------------------------


def test_transform_boxes_identity_rotation_translation() -> None:
    boxes = np.array([[1.0, 0.0, 0.5, 4.0, 2.0, 1.5, 0.0, 0.9]])  # [1, 8] with score
    np.testing.assert_allclose(transform_boxes(np.eye(4), boxes), boxes)
    world_from_agent = se3_from_xyz_rpy(10.0, 0.0, 1.0, 0.0, 0.0, HALF_PI)
    moved = transform_boxes(world_from_agent, boxes)
    np.testing.assert_allclose(moved, [[10.0, 1.0, 1.5, 4.0, 2.0, 1.5, HALF_PI, 0.9]], atol=1e-12)


def test_transform_boxes_wraps_yaw() -> None:
    boxes = np.array([[0.0, 0.0, 0.0, 4.0, 2.0, 1.5, 3.0]])
    moved = transform_boxes(se3_from_xyz_rpy(0, 0, 0, 0, 0, 1.0), boxes)
    assert moved[0, 6] == pytest.approx(4.0 - 2 * math.pi)


def test_transform_boxes_accepts_no_boxes() -> None:
    assert transform_boxes(np.eye(4), np.zeros((0, 9))).shape == (0, 9)


# --- corners and points in boxes --------------------------------------------------------------


def test_corners_of_rotated_box() -> None:
    boxes = np.array([[1.0, 2.0, 3.0, 4.0, 2.0, 6.0, HALF_PI]])
    # Heading along +y: front-left = centre + 2 * y_axis + 1 * (-x_axis) = (0, 4).
    expected_bev = [[0.0, 4.0], [0.0, 0.0], [2.0, 0.0], [2.0, 4.0]]
    np.testing.assert_allclose(box_corners_bev(boxes)[0], expected_bev, atol=1e-12)
    corners = box_corners_3d(boxes)
    assert corners.shape == (1, 8, 3)
    np.testing.assert_allclose(corners[0, :4, 2], 0.0)
    np.testing.assert_allclose(corners[0, 4:, 2], 6.0)
    np.testing.assert_allclose(corners[0, 4:, :2], expected_bev, atol=1e-12)


def test_bev_corners_are_counter_clockwise() -> None:
    corners = box_corners_bev(np.array([[0.0, 0.0, 0.0, 4.0, 2.0, 1.0, 0.7]]))[0]  # [4, 2]
    x, y = corners[:, 0], corners[:, 1]
    signed_area = 0.5 * np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)
    assert signed_area == pytest.approx(8.0)


def test_points_in_rotated_box() -> None:
    # A 4 x 2 x 2 box at (10, 0, 0) turned 90 deg: it spans x in [9, 11], y in [-2, 2].
    boxes = np.array([[10.0, 0.0, 0.0, 4.0, 2.0, 2.0, HALF_PI]])
    points = np.array(
        [
            [10.0, 0.0, 0.0, 1.0],  # centre: inside
            [10.0, 1.9, 0.0, 1.0],  # along the heading, near the front: inside
            [10.9, -1.9, 0.9, 1.0],  # near a corner: inside
            [11.5, 0.0, 0.0, 1.0],  # beyond the side (w/2 = 1): outside
            [10.0, 2.5, 0.0, 1.0],  # beyond the front: outside
            [10.0, 0.0, 1.5, 1.0],  # above the roof: outside
        ]
    )
    inside = points_in_boxes(points, boxes)
    assert inside.shape == (6, 1)
    np.testing.assert_array_equal(inside[:, 0], [True, True, True, False, False, False])
    # A 0.6 m margin takes in the point beyond the side.
    assert points_in_boxes(points, boxes, margin_m=0.6)[3, 0]
    np.testing.assert_array_equal(count_points_in_boxes(points, boxes), [3])


def test_points_in_boxes_empty_inputs() -> None:
    boxes = np.array([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    assert points_in_boxes(np.zeros((0, 3)), boxes).shape == (0, 1)
    assert points_in_boxes(np.zeros((5, 3)), np.zeros((0, 7))).shape == (5, 0)
    assert count_points_in_boxes(np.zeros((0, 4)), boxes).tolist() == [0]


def _brute_force_points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    offsets = points[:, None, :3] - boxes[None, :, :3]  # [P, N, 3]
    cos_yaw, sin_yaw = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    local_x = offsets[..., 0] * cos_yaw + offsets[..., 1] * sin_yaw
    local_y = -offsets[..., 0] * sin_yaw + offsets[..., 1] * cos_yaw
    return (
        (np.abs(local_x) <= boxes[:, 3] / 2)
        & (np.abs(local_y) <= boxes[:, 4] / 2)
        & (np.abs(offsets[..., 2]) <= boxes[:, 5] / 2)
    )


def test_points_in_boxes_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    points = np.column_stack([rng.uniform(-70, 70, (60_000, 2)), rng.uniform(-3, 1, 60_000)])
    boxes = np.column_stack(
        [
            rng.uniform(-60, 60, (150, 2)),  # x, y
            np.full(150, -1.0),  # z
            np.tile([4.5, 2.0, 1.6], (150, 1)),  # l, w, h
            rng.uniform(-3, 3, 150),  # yaw
        ]
    )
    inside = points_in_boxes(points, boxes)
    np.testing.assert_array_equal(inside, _brute_force_points_in_boxes(points, boxes))
    assert inside.any()  # the comparison is not vacuous


# --- BEV IoU ----------------------------------------------------------------------------------


def test_bev_iou_hand_cases() -> None:
    square = [0.0, 0.0, 0.0, 2.0, 2.0, 1.0, 0.0]
    car = [5.0, 5.0, 0.0, 4.0, 2.0, 1.5, 0.3]
    boxes_a = np.array([square, car])
    boxes_b = np.array(
        [
            square,  # identical to square: 1
            [1.0, 0.0, 0.0, 2.0, 2.0, 1.0, 0.0],  # offset 1 m in x: 2 / (4 + 4 - 2) = 1/3
            [0.0, 0.0, 5.0, 2.0, 2.0, 1.0, HALF_PI],  # l == w turned 90 deg (z ignored): 1
            [20.0, 20.0, 0.0, 2.0, 2.0, 1.0, 0.0],  # far away: 0
        ]
    )
    iou = bev_iou_matrix(boxes_a, boxes_b)
    assert iou.shape == (2, 4)
    np.testing.assert_allclose(iou[0], [1.0, 1.0 / 3.0, 1.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(iou[1], 0.0)
    assert bev_iou_matrix(np.array([car]), np.array([car]))[0, 0] == pytest.approx(1.0)


def test_bev_iou_empty_inputs() -> None:
    boxes = np.zeros((3, 7))
    boxes[:, 3:6] = 1.0
    assert bev_iou_matrix(np.zeros((0, 7)), boxes).shape == (0, 3)
    assert bev_iou_matrix(boxes, np.zeros((0, 7))).shape == (3, 0)
    assert bev_iou_matrix(np.zeros((0, 7)), np.zeros((0, 7))).shape == (0, 0)
