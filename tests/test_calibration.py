"""Calibration models, their wire form, pose noise, and a check against a real nuScenes keyframe."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from agents.nuscenes import NuScenesKeyframe, load_nuscenes_keyframe
from agents.opv2v import DatasetError
from fusion.calibration import (
    AgentCalibration,
    CalibrationError,
    CameraModel,
    LidarModel,
    PoseEstimate,
    calibration_from_proto,
    calibration_to_proto,
    check_rigid,
    perturb_extrinsic,
    perturb_pose,
    planar_sigma,
    pose_estimate_from_proto,
    pose_estimate_to_proto,
)
from fusion.receive import FrameRefused, check_pose
from models.boxes import count_points_in_boxes, points_in_boxes
from models.geometry import se3_from_xyz_rpy, transform_boxes, yaw_from_matrix
from protos import SensorCalibration

NUSCENES = Path(os.environ.get("CPSTREAM_NUSCENES_DIR")
                or Path(__file__).resolve().parents[2] / "shared/data/real/nuscenes")
"""The real nuScenes keyframe: ``$CPSTREAM_NUSCENES_DIR``, else ``shared/data/real/nuscenes`` beside the repo."""

# The OpenCV optical frame (x right, y down, z forward) in an x-forward, y-left, z-up frame.
FORWARD_FROM_OPTICAL = np.array([[0.0, 0.0, 1.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0],
                                 [0.0, 0.0, 0.0, 1.0]])
K_TEST = np.array([[1000.0, 0.0, 640.0], [0.0, 800.0, 360.0], [0.0, 0.0, 1.0]])


def _front_camera(x_m: float = 0.0, y_m: float = 0.0, z_m: float = 0.0, name: str = "front") -> CameraModel:
    """A 1280x720 camera at (x, y, z) on the agent, looking along the agent's +x."""
    agent_from_camera = se3_from_xyz_rpy(x_m, y_m, z_m, 0.0, 0.0, 0.0) @ FORWARD_FROM_OPTICAL
    return CameraModel.create(name, 1280, 720, K_TEST, agent_from_camera)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two (x1, y1, x2, y2) boxes."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ----------------------------------------------------------------------------- rigid transforms

def test_check_rigid_accepts_a_rigid_transform_as_float64() -> None:
    pose = se3_from_xyz_rpy(1.0, 2.0, 3.0, 0.1, -0.2, 2.5).astype(np.float32)
    checked = check_rigid(pose, "pose")
    assert checked.dtype == np.float64 and np.allclose(checked, pose)


@pytest.mark.parametrize(("matrix", "defect"), [
    (np.where(np.eye(4) == 1, np.nan, 0.0), "not finite"),
    (np.diag([2.0, 2.0, 2.0, 1.0]), "not orthonormal"),
    (np.diag([1.0, -1.0, 1.0, 1.0]), "reflection"),
    (np.vstack([np.eye(4)[:3], [0.0, 0.0, 1.0, 1.0]]), "last row"),
    (np.eye(3), "4x4"),
])
def test_check_rigid_refuses_and_names_the_thing(matrix: np.ndarray, defect: str) -> None:
    with pytest.raises(CalibrationError, match=defect) as err:
        check_rigid(matrix, "camera 'front' agent_from_camera")
    assert str(err.value).startswith("camera 'front' agent_from_camera")


def test_check_pose_in_receive_still_refuses_frames() -> None:
    check_pose(np.eye(4))
    with pytest.raises(FrameRefused, match="pose is not a rigid transform"):
        check_pose(np.diag([1.0, 1.0, 3.0, 1.0]))
    with pytest.raises(FrameRefused, match="pose is not finite"):
        check_pose(np.full((4, 4), np.nan))


# ----------------------------------------------------------------------------- camera model

def test_camera_refuses_negative_focal_length() -> None:
    intrinsic = K_TEST * np.array([[-1.0], [1.0], [1.0]])
    with pytest.raises(CalibrationError, match=r"camera 'left'.*focal") as err:
        CameraModel.create("left", 1280, 720, intrinsic, FORWARD_FROM_OPTICAL)
    assert "-1000" in str(err.value)


@pytest.mark.parametrize(("intrinsic", "defect"), [
    (np.array([[1000.0, 0, 640], [0, 800, 360], [0, 0, 2]]), "0, 0, 1"),
    (np.array([[1000.0, 0, 5000], [0, 800, 360], [0, 0, 1]]), "principal point cx"),
])
def test_camera_refuses_malformed_intrinsics(intrinsic: np.ndarray, defect: str) -> None:
    with pytest.raises(CalibrationError, match=defect):
        CameraModel.create("front", 1280, 720, intrinsic, FORWARD_FROM_OPTICAL)


def test_camera_model_is_read_only() -> None:
    camera = _front_camera()
    with pytest.raises(ValueError):
        camera.intrinsic[0, 0] = 1.0


def test_point_on_the_optical_axis_projects_to_the_principal_point() -> None:
    camera = _front_camera(1.0, -0.5, 1.5)
    uv, depth_m = camera.project(np.array([[31.0, -0.5, 1.5]]))
    np.testing.assert_allclose(uv, [[640.0, 360.0]], atol=1e-9)
    np.testing.assert_allclose(depth_m, [30.0])


def test_known_point_projects_exactly() -> None:
    # Camera at (1, 0, 1.5); the point is 10 m ahead, 2 m left and 1 m below it:
    # optical (x, y, z) = (-2, 1, 10) -> u = 640 + 1000 * -0.2, v = 360 + 800 * 0.1.
    camera = _front_camera(1.0, 0.0, 1.5)
    uv, depth_m = camera.project(np.array([[11.0, 2.0, 0.5, 42.0]]))  # extra column ignored
    np.testing.assert_allclose(uv, [[440.0, 440.0]], atol=1e-9)
    np.testing.assert_allclose(depth_m, [10.0])
    assert camera.visible(uv, depth_m).tolist() == [True]


def test_points_behind_the_camera_are_never_visible() -> None:
    camera = _front_camera()
    # Mirrored through the camera these would land inside the image.
    points = np.array([[-10.0, -2.0, 1.0], [0.0, 0.0, 0.0], [10.0, 100.0, 0.0], [10.0, 0.0, 0.0]])
    uv, depth_m = camera.project(points)
    assert np.isnan(uv[:2]).all()
    assert camera.visible(uv, depth_m).tolist() == [False, False, False, True]


def test_box_2d_of_a_box_in_front() -> None:
    camera = _front_camera()
    # 2 x 2 x 1 m box, near face 9 m ahead: its near corners bound the image box.
    box = camera.box_2d(np.array([10.0, 0.0, 0.0, 2.0, 2.0, 1.0, 0.0]))
    np.testing.assert_allclose(box, [640 - 1000 / 9, 360 - 400 / 9, 640 + 1000 / 9, 360 + 400 / 9])


def test_box_2d_of_a_box_half_behind_the_camera_uses_only_the_corners_in_front() -> None:
    camera = _front_camera()
    # 24 m long, from 14 m behind the camera to 10 m ahead of it, spanning y in [0, 2] and z in [0, 1]
    # (optical x in [-2, 0], y in [-1, 0]). The corners 10 m ahead give u in [440, 640], v in [280, 360];
    # the ones behind, if they were projected, would mirror to u up to 783 and v up to 417.
    box = camera.box_2d(np.array([-2.0, 1.0, 0.5, 24.0, 2.0, 1.0, 0.0]))
    np.testing.assert_allclose(box, [440.0, 280.0, 640.0, 360.0], atol=1e-9)


def test_box_2d_is_clipped_to_the_image_and_none_when_out_of_sight() -> None:
    camera = _front_camera()
    # Spanning y in [0, 8] (optical x in [-8, 0]), the near face 9 m ahead reaches u = 640 - 8000 / 9 < 0:
    # the image box stops at the image's left edge.
    box = camera.box_2d(np.array([10.0, 4.0, 0.0, 2.0, 8.0, 1.0, 0.0]))
    np.testing.assert_allclose(box, [0.0, 360 - 400 / 9, 640.0, 360 + 400 / 9], atol=1e-9)
    assert camera.box_2d(np.array([-10.0, 0.0, 0.0, 2.0, 2.0, 1.0, 0.0])) is None  # behind
    assert camera.box_2d(np.array([5.0, 50.0, 0.0, 2.0, 2.0, 1.0, 0.0])) is None  # far to the left


# ----------------------------------------------------------------------------- agent calibration and protos

def _calibration() -> AgentCalibration:
    lidar = LidarModel.create(se3_from_xyz_rpy(0.5, 0.0, 1.9, 0.0, 0.0, 0.01), beams=32, range_m=70.0)
    cameras = [_front_camera(1.5, 0.0, 1.5, "front"),
               CameraModel.create("rear", 1600, 900, [[800.0, 0, 800.5], [0, 800.0, 450.25], [0, 0, 1]],
                                  se3_from_xyz_rpy(-1.0, 0.1, 1.6, 0.0, 0.0, math.pi) @ FORWARD_FROM_OPTICAL)]
    return AgentCalibration.create(lidar, cameras)


def test_unknown_camera_is_named_with_the_ones_present() -> None:
    with pytest.raises(CalibrationError, match=r"agent has no camera 'nope' \(it has: front, rear\)"):
        _calibration().camera("nope")
    assert _calibration().camera("rear").width_px == 1600


def test_duplicate_camera_names_are_refused() -> None:
    with pytest.raises(CalibrationError, match="'front'"):
        AgentCalibration.create(None, [_front_camera(), _front_camera()])


def test_calibration_proto_round_trip_is_exact() -> None:
    calibration = _calibration()
    wire = calibration_to_proto(calibration).SerializeToString()
    decoded = calibration_from_proto(SensorCalibration.FromString(wire))
    assert decoded.camera_names == ("front", "rear")
    for mine, theirs in zip(calibration.cameras, decoded.cameras, strict=True):
        assert (mine.name, mine.width_px, mine.height_px) == (theirs.name, theirs.width_px, theirs.height_px)
        assert np.array_equal(mine.intrinsic, theirs.intrinsic)
        assert np.array_equal(mine.agent_from_camera, theirs.agent_from_camera)
    assert np.array_equal(decoded.lidar.agent_from_lidar, calibration.lidar.agent_from_lidar)
    assert (decoded.lidar.beams, decoded.lidar.range_m) == (32, 70.0)
    assert calibration_from_proto(calibration_to_proto(AgentCalibration.create(None, []))).lidar is None


def test_calibration_from_proto_names_the_bad_field() -> None:
    msg = calibration_to_proto(_calibration())
    del msg.cameras[1].intrinsic[-1]
    with pytest.raises(CalibrationError, match=r"agent 7: camera 'rear': intrinsic has 8 values, expected 9"):
        calibration_from_proto(msg, agent="agent 7")
    msg = calibration_to_proto(_calibration())
    msg.cameras[0].ClearField("agent_from_camera")
    with pytest.raises(CalibrationError, match="camera 'front': agent_from_camera is missing"):
        calibration_from_proto(msg)
    msg = calibration_to_proto(_calibration())
    msg.lidar.agent_from_lidar.row_major[0] = 3.0
    with pytest.raises(CalibrationError, match="lidar agent_from_lidar is not a rigid transform"):
        calibration_from_proto(msg)


# ----------------------------------------------------------------------------- poses

def _covariance() -> np.ndarray:
    factor = np.random.default_rng(3).normal(size=(6, 6)) * 0.1
    return factor @ factor.T


def test_pose_with_covariance_round_trips() -> None:
    estimate = PoseEstimate.create(se3_from_xyz_rpy(100.0, -20.0, 1.0, 0.01, -0.02, 2.0), _covariance())
    decoded = pose_estimate_from_proto(pose_estimate_to_proto(estimate))
    np.testing.assert_allclose(decoded.world_from_agent, estimate.world_from_agent, atol=1e-12)
    assert np.array_equal(decoded.covariance, estimate.covariance)
    plain = pose_estimate_from_proto(pose_estimate_to_proto(PoseEstimate.create(np.eye(4))))
    assert plain.covariance is None


def test_bad_covariances_are_refused() -> None:
    msg = pose_estimate_to_proto(PoseEstimate.create(np.eye(4), _covariance()))
    msg.covariance[1] += 0.5
    with pytest.raises(CalibrationError, match="agent 2 pose: covariance is not symmetric"):
        pose_estimate_from_proto(msg, "agent 2 pose")
    with pytest.raises(CalibrationError, match="not positive semi-definite"):
        PoseEstimate.create(np.eye(4), np.diag([1.0, 1.0, 1.0, 1.0, 1.0, -1.0]))
    del msg.covariance[5:]
    with pytest.raises(CalibrationError, match="covariance has 5 values, expected 36"):
        pose_estimate_from_proto(msg)


def test_planar_sigma() -> None:
    covariance = np.diag([0.04, 0.09, 1.0, 1.0, 1.0, 0.0025])
    sigma_xy_m, sigma_yaw_rad = planar_sigma(covariance)
    assert sigma_xy_m == pytest.approx(0.3) and sigma_yaw_rad == pytest.approx(0.05)


def test_perturb_pose_with_zero_sigma_returns_the_same_pose() -> None:
    pose = se3_from_xyz_rpy(500.0, -300.0, 2.0, 0.02, 0.01, 1.0)
    assert np.array_equal(perturb_pose(pose, 0.0, 0.0, np.random.default_rng(0)), pose)


def test_perturb_pose_stays_rigid_and_turns_about_the_agent() -> None:
    rng = np.random.default_rng(1)
    pose = se3_from_xyz_rpy(5000.0, -3000.0, 2.0, 0.02, 0.01, 1.0)  # far from the world origin
    # A heading error alone must not move the agent.
    turned = perturb_pose(pose, 0.0, 5.0, rng)
    assert np.array_equal(turned[:3, 3], pose[:3, 3])
    check_rigid(turned, "perturbed pose")
    noisy = np.stack([perturb_pose(pose, 0.5, 5.0, rng) for _ in range(2000)])  # [2000, 4, 4]
    position_error_m = noisy[:, :2, 3] - pose[:2, 3]  # [2000, 2]
    np.testing.assert_allclose(position_error_m.std(axis=0), [0.5, 0.5], rtol=0.1)
    yaw_error_deg = np.degrees([yaw_from_matrix(m) - yaw_from_matrix(pose) for m in noisy])
    assert yaw_error_deg.std() == pytest.approx(5.0, rel=0.1)
    for m in noisy[:20]:
        check_rigid(m, "perturbed pose")
        assert np.linalg.det(m[:3, :3]) == pytest.approx(1.0)


def test_perturb_extrinsic_has_exactly_the_given_size() -> None:
    mount = se3_from_xyz_rpy(1.5, 0.2, 1.6, 0.0, 0.0, 0.3) @ FORWARD_FROM_OPTICAL
    for seed in range(5):
        moved = perturb_extrinsic(mount, 0.1, 2.0, np.random.default_rng(seed))
        check_rigid(moved, "perturbed mount")
        assert np.hypot(*(moved[:2, 3] - mount[:2, 3])) == pytest.approx(0.1)
        assert moved[2, 3] == mount[2, 3]
        turn = moved[:3, :3] @ mount[:3, :3].T  # a rotation about the agent's z axis only
        assert turn[2, 2] == pytest.approx(1.0)
        assert abs(math.degrees(yaw_from_matrix(turn))) == pytest.approx(2.0)


# ----------------------------------------------------------------------------- a real nuScenes keyframe

@pytest.fixture(scope="module")
def keyframe() -> NuScenesKeyframe:
    if not NUSCENES.is_dir():
        pytest.skip(f"the nuScenes sample is not at {NUSCENES} (shared/data/real/nuscenes next to the repo, "
                    "or set CPSTREAM_NUSCENES_DIR)")
    return load_nuscenes_keyframe(NUSCENES)


def _cameras(keyframe: NuScenesKeyframe, agent_from_lidar: np.ndarray) -> AgentCalibration:
    """The keyframe's cameras through our calibration code (and its wire form)."""
    cameras = [CameraModel.create(c.name, c.width_px, c.height_px, c.intrinsic, agent_from_lidar @ c.lidar_from_camera)
               for c in keyframe.cameras]
    return calibration_from_proto(calibration_to_proto(AgentCalibration.create(None, cameras)), "nuScenes")


def _cameras_on_ego(keyframe: NuScenesKeyframe) -> AgentCalibration:
    """The cameras as mounted on the vehicle, agent frame = ego frame."""
    return AgentCalibration.create(None, [CameraModel.create(c.name, c.width_px, c.height_px, c.intrinsic,
                                                             c.ego_from_camera) for c in keyframe.cameras])


def _mean_iou(keyframe: NuScenesKeyframe, calibration: AgentCalibration, boxes: np.ndarray) -> float:
    ious = []
    for camera in keyframe.cameras:
        model = calibration.camera(camera.name)
        for box_2d, index in zip(camera.boxes_2d, camera.instance_index, strict=True):
            projected = model.box_2d(boxes[index])
            ious.append(0.0 if projected is None else _iou(projected, box_2d))
    return float(np.mean(ious))


def test_loader_names_what_is_missing(tmp_path: Path, keyframe: NuScenesKeyframe) -> None:
    with pytest.raises(DatasetError, match="expected one info file"):
        load_nuscenes_keyframe(tmp_path)
    info = next(NUSCENES.glob("*.pkl"))
    (tmp_path / info.name).write_bytes(info.read_bytes())
    with pytest.raises(DatasetError, match=r"__CAM_FRONT__\d+\.jpg: file not found"):
        load_nuscenes_keyframe(tmp_path)


def test_nuscenes_boxes_project_onto_their_2d_annotations(keyframe: NuScenesKeyframe) -> None:
    assert [c.width_px for c in keyframe.cameras] == [1600] * 6 and len(keyframe.boxes_lidar) == 69
    annotations = sum(len(c.boxes_2d) for c in keyframe.cameras)
    assert annotations == 84 and all((c.instance_index >= 0).all() for c in keyframe.cameras)
    # The LiDAR frame is the agent frame; its yaw-only boxes ignore the frame's ~2 degree tilt.
    lidar_iou = _mean_iou(keyframe, _cameras(keyframe, np.eye(4)), keyframe.boxes_lidar)
    # In the global frame the annotated boxes are upright, and the projection is exact.
    world_iou = _mean_iou(keyframe, _cameras(keyframe, keyframe.world_from_lidar), keyframe.boxes_world)
    # The cameras' mounts on the vehicle (cam2ego) miss the ego motion between the sweep and each exposure.
    mount_iou = _mean_iou(keyframe, _cameras_on_ego(keyframe), transform_boxes(keyframe.ego_from_lidar,
                                                                               keyframe.boxes_lidar))
    # z as the bottom face instead of the centre: clearly wrong.
    bottom = keyframe.boxes_lidar + np.array([0, 0, 0.5, 0, 0, 0, 0]) * keyframe.boxes_lidar[:, [5]]
    bottom_iou = _mean_iou(keyframe, _cameras(keyframe, np.eye(4)), bottom)
    print(f"mean IoU over {annotations} annotations: LiDAR frame {lidar_iou:.4f}, global frame {world_iou:.6f}, "
          f"mount only {mount_iou:.4f}, z taken as the bottom {bottom_iou:.4f}")
    assert lidar_iou >= 0.9, lidar_iou
    assert world_iou >= 0.99, world_iou
    assert bottom_iou < 0.6, bottom_iou
    assert mount_iou < lidar_iou - 0.05, mount_iou


def test_nuscenes_lidar_points_land_in_their_objects(keyframe: NuScenesKeyframe) -> None:
    calibration = _cameras(keyframe, np.eye(4))
    points = keyframe.points_lidar[:, :3]  # [N, 3]
    inside = points_in_boxes(points, keyframe.boxes_lidar)  # [N, K]
    hits = total = 0
    # Only the points each camera sees: an object cut by the image edge is annotated by its visible part.
    for camera in keyframe.cameras:
        model = calibration.camera(camera.name)
        uv, depth_m = model.project(points)
        visible = model.visible(uv, depth_m)
        assert not visible[depth_m <= 0].any(), camera.name
        assert visible.sum() > 1000, camera.name
        for (x1, y1, x2, y2), index in zip(camera.boxes_2d, camera.instance_index, strict=True):
            members = inside[:, index] & visible
            if members.sum() < 10:
                continue
            u, v = uv[members, 0], uv[members, 1]
            margin_px = 3.0
            hits += int(np.sum((u >= x1 - margin_px) & (u <= x2 + margin_px) & (v >= y1 - margin_px)
                               & (v <= y2 + margin_px)))
            total += int(members.sum())
    # The annotated point counts agree with the boxes' contents only with z at the centre.
    counted = count_points_in_boxes(points, keyframe.boxes_lidar)  # [K]
    miscounted = int(np.abs(counted - keyframe.num_lidar_points).sum())
    assert miscounted <= 0.05 * keyframe.num_lidar_points.sum(), miscounted
    print(f"{hits} of {total} LiDAR points in annotated boxes project into the 2D annotation")
    assert total > 500 and hits >= 0.9 * total, (hits, total)
