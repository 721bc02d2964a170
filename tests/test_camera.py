"""Camera frames onto the BEV grid: a marker on the ground, rendered by the world's ray caster, lands in its cell."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents.world.sensors import PEDESTRIAN, build_scene, pinhole_intrinsic, render_camera
from models.bev import BevGridConfig
from models.camera import CameraBevEncoder, CameraInputError, check_image, ground_sampling, lift_to_bev

GRID = BevGridConfig(x_min_m=-24.0, x_max_m=24.0, y_min_m=-24.0, y_max_m=24.0, cell_size_m=0.5).build()
WIDTH, HEIGHT = 320, 240


def camera_looking_at(position: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``world_from_camera`` with OpenCV axes (x right, y down, z forward) and no roll."""
    forward = (target - position) / np.linalg.norm(target - position)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, down, forward], axis=1)
    pose[:3, 3] = position
    return pose


def marker_image(marker_xy: np.ndarray, world_from_camera: np.ndarray, intrinsic: np.ndarray) -> np.ndarray:
    """The world's renderer's view of a flat red 1 m square on grey ground."""
    marker = np.array([[marker_xy[0], marker_xy[1], 0.01, 1.0, 1.0, 0.02, 0.3]])
    scene = build_scene(80.0, np.zeros((0, 7)), marker, np.array([PEDESTRIAN]), np.array([7]), np.array([[1.0, 0.0, 0.0]]))
    return render_camera(scene, world_from_camera, intrinsic, WIDTH, HEIGHT,
                         lambda points: np.full((len(points), 3), 0.5))


POSES = [  # (camera position, where it looks, the marker): poles at street corners and a car's front camera
    ((0.0, 0.0, 6.0), (10.0, 0.0, 0.0), (8.3, 1.6)),
    ((5.0, -5.0, 8.0), (-3.0, 6.0, 0.0), (-1.2, 3.9)),
    ((-10.0, 12.0, 5.0), (0.0, 0.0, 0.0), (-4.4, 6.1)),
    ((0.0, 0.0, 1.6), (20.0, 3.0, 0.0), (7.7, 1.3)),
    ((3.0, 3.0, 10.0), (3.5, 3.0, 0.0), (1.9, 4.6)),  # looking almost straight down
]


@pytest.mark.parametrize("position, target, marker_xy", POSES)
def test_a_marked_ground_point_lands_in_its_bev_cell(position, target, marker_xy) -> None:
    # The BEV frame is the world frame here (an agent at the origin); the camera sits on a pole or a car.
    world_from_camera = camera_looking_at(np.array(position), np.array(target))
    intrinsic = pinhole_intrinsic(WIDTH, HEIGHT, 90.0)
    image = marker_image(np.array(marker_xy), world_from_camera, intrinsic)
    red = (image[..., 0] > 150) & (image[..., 1] < 60)
    assert red.sum() > 4, "the marker must be in view"
    sampling = ground_sampling("pole", intrinsic, world_from_camera, GRID, HEIGHT, WIDTH)
    for stride in (1, 4):  # a full-resolution map and a backbone-like stride-4 one over the same image
        mask = torch.from_numpy(red.astype(np.float32))[None, None]
        features = torch.nn.functional.avg_pool2d(mask, stride) if stride > 1 else mask
        lifted, seen = lift_to_bev(features, [sampling])
        weight = lifted[0].numpy()
        assert weight.sum() > 0
        rows, cols = np.nonzero(weight)
        centre = np.average(GRID.cell_centre(rows, cols), axis=0, weights=weight[rows, cols])
        row, col, inside = GRID.cell_of(centre[None])
        true_row, true_col, _ = GRID.cell_of(np.array([marker_xy]))
        assert inside[0]
        assert abs(row[0] - true_row[0]) <= 1 and abs(col[0] - true_col[0]) <= 1, (centre, marker_xy)
        assert seen.max() == 1.0 and seen.min() == 0.0  # one camera; it does not see the whole grid


def test_cells_behind_the_camera_or_outside_its_image_are_not_seen() -> None:
    world_from_camera = camera_looking_at(np.array([0.0, 0.0, 5.0]), np.array([10.0, 0.0, 0.0]))
    sampling = ground_sampling("pole", pinhole_intrinsic(WIDTH, HEIGHT, 90.0), world_from_camera, GRID, HEIGHT, WIDTH)
    behind = GRID.cell_of(np.array([[-10.0, 0.0]]))
    ahead = GRID.cell_of(np.array([[12.0, 0.0]]))
    beside = GRID.cell_of(np.array([[2.0, 20.0]]))  # 84 degrees off the axis: outside a 90 degree view
    assert not sampling.valid[behind[0][0], behind[1][0]]
    assert sampling.valid[ahead[0][0], ahead[1][0]]
    assert not sampling.valid[beside[0][0], beside[1][0]]


def test_two_cameras_are_averaged_where_both_see_a_cell() -> None:
    intrinsic = pinhole_intrinsic(WIDTH, HEIGHT, 90.0)
    a = ground_sampling("a", intrinsic, camera_looking_at(np.array([-8.0, 0.0, 6.0]), np.array([4.0, 0.0, 0.0])),
                        GRID, HEIGHT, WIDTH)
    b = ground_sampling("b", intrinsic, camera_looking_at(np.array([8.0, 0.0, 6.0]), np.array([-4.0, 0.0, 0.0])),
                        GRID, HEIGHT, WIDTH)
    features = torch.stack([torch.full((1, 60, 80), 2.0), torch.full((1, 60, 80), 4.0)])
    lifted, seen = lift_to_bev(features, [a, b])
    both, only_a = a.valid & b.valid, a.valid & ~b.valid
    assert both.any() and only_a.any()
    assert torch.allclose(lifted[0][torch.from_numpy(both)], torch.tensor(3.0))
    assert torch.allclose(lifted[0][torch.from_numpy(only_a)], torch.tensor(2.0))
    assert torch.all(lifted[0][torch.from_numpy(~a.valid & ~b.valid)] == 0)
    assert seen.max() == 2.0


def test_a_camera_looking_at_the_sky_is_refused_by_name() -> None:
    up = camera_looking_at(np.array([0.0, 0.0, 2.0]), np.array([0.0, 0.1, 50.0]))
    with pytest.raises(CameraInputError, match="camera 'pole3'.*ground plane is behind the camera"):
        ground_sampling("pole3", pinhole_intrinsic(WIDTH, HEIGHT, 90.0), up, GRID, HEIGHT, WIDTH)
    # Tilted 45 degrees up: the ground ahead is in front of it, but under the image's lower edge.
    tilted = camera_looking_at(np.array([0.0, 0.0, 2.0]), np.array([10.0, 0.0, 12.0]))
    with pytest.raises(CameraInputError, match="camera 'pole4'.*not in view"):
        ground_sampling("pole4", pinhole_intrinsic(WIDTH, HEIGHT, 90.0), tilted, GRID, HEIGHT, WIDTH)


@pytest.mark.parametrize("intrinsic, extrinsic, match", [
    (np.diag([-200.0, 200.0, 1.0]), np.eye(4), "positive focal"),
    (np.full((3, 3), np.nan), np.eye(4), "finite 3 x 3"),
    (pinhole_intrinsic(WIDTH, HEIGHT, 90.0), np.diag([2.0, 1.0, 1.0, 1.0]), "not a rigid transform"),
])
def test_bad_calibration_is_refused_by_name(intrinsic, extrinsic, match) -> None:
    with pytest.raises(CameraInputError, match=f"camera 'front'.*{match}"):
        ground_sampling("front", intrinsic, extrinsic, GRID, HEIGHT, WIDTH)


@pytest.mark.parametrize("image, match", [
    (np.zeros((HEIGHT, WIDTH, 3), np.float32), "uint8"),
    (np.zeros((3, HEIGHT, WIDTH), np.uint8), "channels last"),
    (np.zeros((HEIGHT, WIDTH, 4), np.uint8), "channels last"),
    (np.zeros((HEIGHT, WIDTH), np.uint8), "channels last"),
    (np.zeros((HEIGHT // 2, WIDTH, 3), np.uint8), "calibration is for 320 x 240"),
])
def test_bad_frames_are_refused_by_name(image, match) -> None:
    with pytest.raises(CameraInputError, match=f"camera 'left'.*{match}"):
        check_image("left", image, HEIGHT, WIDTH)
    assert check_image("left", np.zeros((HEIGHT, WIDTH, 3), np.uint8), HEIGHT, WIDTH).shape == (HEIGHT, WIDTH, 3)


@pytest.mark.parametrize("backbone", ["mobiledet_tiny", "nextvit_tiny"])
def test_camera_encoders_build_and_run_on_tiny_images(backbone: str) -> None:
    torch.manual_seed(0)
    encoder = CameraBevEncoder(backbone, out_channels=16, reduction=8)
    grid = BevGridConfig(x_min_m=-16.0, x_max_m=16.0, y_min_m=-16.0, y_max_m=16.0, cell_size_m=1.0).build()
    intrinsic = pinhole_intrinsic(96, 64, 90.0)
    samplings = [ground_sampling(f"camera{k}", intrinsic,
                                 camera_looking_at(np.array([0.0, 0.0, 4.0]), np.array([8.0 * np.cos(a), 8.0 * np.sin(a), 0.0])),
                                 grid, 64, 96) for k, a in enumerate((0.0, np.pi))]
    images = torch.randint(0, 256, (2, 64, 96, 3), dtype=torch.uint8)
    assert encoder.image_features(images).shape == (2, 16, 8, 12)
    bev, seen = encoder(images, samplings)
    assert bev.shape == (16, 32, 32) and seen.shape == (32, 32)
    unseen = ~torch.from_numpy(samplings[0].valid | samplings[1].valid)
    assert unseen.any() and torch.all(bev[:, unseen] == 0) and torch.all(bev[:, ~unseen].abs().sum(0) > 0)
    bev.sum().backward()  # trainable end to end
    assert all(p.grad is not None for p in encoder.image.parameters() if p.requires_grad)


def test_camera_agents_train_through_the_same_detector_and_fusion(tmp_path) -> None:
    from agents.world.crossing import CrossingConfig, CrossingWorld
    from launch.samples import camera_sample
    from models.cooperative import agent_features
    from models.detector import DetectorConfig, build_detector
    from models.train import OptimConfig, rotate_scene, train

    world = CrossingWorld(CrossingConfig(seed=1, frames=2, cameras=3, people=12, width_px=96, height_px=72))
    detector = build_detector(DetectorConfig(
        grid=BevGridConfig(x_min_m=-10.0, x_max_m=10.0, y_min_m=-10.0, y_max_m=10.0, cell_size_m=0.25),
        feature_reduction=2, feature_channels=8, head_channels=8, camera_backbone="nextvit_tiny", camera_reduction=4))
    sample = camera_sample(world.frame(1), detector.grid, detector.feature_cell_m, area_half_m=7.0)
    assert sample.camera_agents() == [0, 1, 2] and all(len(p) == 0 for p in sample.points)
    assert len(sample.gt_boxes) == 12  # everyone on the plaza is scored
    assert all(0 < len(b) <= 12 for b in sample.agent_gt_boxes)  # each camera is trained on what it views
    np.testing.assert_allclose(sample.ego_from_agent, np.eye(4)[None].repeat(3, 0))  # one site frame
    features = agent_features(detector, sample)
    assert features.shape == (3, 8, 40, 40)
    # A turned scene turns the cameras with it (their samplings are computed from the moved calibration).
    turned = rotate_scene(sample, 0.5, detector.feature_cell_m)
    assert not np.allclose(turned.cameras[0].bev_from_camera, sample.cameras[0].bev_from_camera)
    losses = train(detector, [sample], OptimConfig(steps=3, mirror_probability=0.5, early_fusion_loss=True,
                                                   checkpoint_every=10), tmp_path / "camera.pt")
    assert len(losses) == 3 and all(np.isfinite(losses))


def _tiny_town_frame(agents: int = 3):
    from agents.world import SyntheticWorld, WorldConfig

    world = SyntheticWorld(WorldConfig(seed=5, agents=agents, frames=1,
                                       camera={"count": 2, "width_px": 64, "height_px": 48}))
    return world.frame(0)


def test_mixed_samples_swap_the_last_agents_lidar_for_their_cameras() -> None:
    from launch.samples import coop_sample, mixed_sample

    frame = _tiny_town_frame()
    grid = BevGridConfig(x_min_m=-20.0, x_max_m=20.0, y_min_m=-20.0, y_max_m=20.0, cell_size_m=0.5).build()
    full = coop_sample(frame, grid, 1.0)
    mixed = mixed_sample(frame, grid, 1.0, 1)
    assert mixed.camera_agents() == [2] and len(mixed.points[2]) == 0 and mixed.cameras[2].images.shape == (2, 48, 64, 3)
    for k in (0, 1):
        np.testing.assert_array_equal(mixed.points[k], full.points[k])
    # Scored on the same objects with or without the camera agent's LiDAR; its own are what its LiDAR sees.
    np.testing.assert_array_equal(mixed.gt_boxes, full.gt_boxes)
    for own, expected in zip(mixed.agent_gt_boxes, full.agent_gt_boxes, strict=True):
        np.testing.assert_array_equal(own, expected)
    assert mixed_sample(frame, grid, 1.0, 3).camera_agents() == [0, 1, 2]  # vehicles with cameras only
    with pytest.raises(ValueError, match="camera_agents=4"):
        mixed_sample(frame, grid, 1.0, 4)


def test_training_only_the_camera_path_leaves_the_lidar_detector_as_it_was(tmp_path) -> None:
    from launch.samples import mixed_sample
    from models.detector import DetectorConfig, build_detector
    from models.train import OptimConfig, train

    torch.manual_seed(0)
    detector = build_detector(DetectorConfig(
        grid=BevGridConfig(x_min_m=-20.0, x_max_m=20.0, y_min_m=-20.0, y_max_m=20.0, cell_size_m=0.5),
        feature_channels=8, head_channels=8, camera_backbone="mobiledet_tiny", camera_reduction=8))
    sample = mixed_sample(_tiny_town_frame(), detector.grid, detector.feature_cell_m, 1)
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    train(detector, [sample], OptimConfig(steps=3, trains="camera", mirror_probability=0.0, early_fusion_loss=False,
                                          checkpoint_every=10), tmp_path / "mixed.pt")
    after = detector.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("camera.") for k in changed)
    assert any(k.startswith("camera.") and k.endswith("weight") for k in changed)  # it did learn
