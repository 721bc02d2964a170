"""A camera agent node: a pole's image lifted onto its BEV grid and sent like LiDAR features; a bad camera
frame or calibration is refused by the camera's name, counted, and nothing is lifted from it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from agents.node import AgentNode, AgentNodeConfig, FrameSource, SourceConfig
from agents.world.crossing import CrossingConfig
from models.bev import BevGridConfig
from models.detector import BevDetector, DetectorConfig, build_detector

CROSSING = CrossingConfig(seed=1, frames=3, cameras=2, people=12, width_px=96, height_px=72)
GRID = BevGridConfig(x_min_m=-10.0, x_max_m=10.0, y_min_m=-10.0, y_max_m=10.0, cell_size_m=0.25)


@pytest.fixture(scope="module")
def detector() -> BevDetector:
    torch.manual_seed(0)
    return build_detector(DetectorConfig(grid=GRID, feature_reduction=2, feature_channels=8, head_channels=8,
                                         camera_backbone="mobiledet_tiny", camera_reduction=4)).eval()


def _node(detector: BevDetector, cameras=None) -> AgentNode:
    """Pole -1 of the crossing; ``cameras`` (a function of the pole's camera) replaces what it sees from frame 1 on."""
    config = AgentNodeConfig(agent_id=-1, source=SourceConfig(kind="crossing", crossing=CROSSING), codec=None,
                             raw_dtype="float32")
    source = FrameSource(config.source, config.agent_id)
    if cameras is not None:
        frame = source.frame

        def patched(index: int):
            agent = frame(index)
            return agent if index == 0 else dataclasses.replace(agent, cameras=cameras(agent.cameras[0]))

        source.frame = patched
    return AgentNode(config, detector, None, source)


def _features(message, detector: BevDetector) -> np.ndarray:
    grid = detector.feature_grid
    return np.frombuffer(message.tiles[0].payload, np.float32).reshape(8, grid.height_cells, grid.width_cells)


def _view(detector: BevDetector, camera) -> np.ndarray:
    """The cells the camera sees (the pole's BEV frame is the site frame)."""
    return detector.camera_sampling("view", camera.intrinsic, camera.lidar_from_camera, 72, 96).valid


def test_a_pole_sends_its_image_lifted_onto_the_ground_plane(detector: BevDetector) -> None:
    node = _node(detector)
    assert node.uses_cameras(node.source.frame(0))
    message = node.compute(0, 0)
    features = _features(message, detector)
    seen = _view(detector, node.source.frame(0).cameras[0])
    assert 0.05 < seen.mean() < 0.95  # the camera sees part of the grid
    assert np.all(features[:, ~seen] == 0)  # nothing is made up where the camera does not look
    assert np.abs(features[:, seen]).sum(axis=0).min() > 0
    assert message.agent_id == -1 and node.counters.camera_refused == {}


def _sky(camera):
    """The camera turned to look straight up from 5 m: the ground plane is behind it."""
    up = np.eye(4)
    up[2, 3] = 5.0
    return dataclasses.replace(camera, lidar_from_camera=up)


@pytest.mark.parametrize(("bad", "says"), [
    (lambda c: dataclasses.replace(c, image_rgb=c.image_rgb[..., 0]), "RGB"),
    (lambda c: dataclasses.replace(c, image_rgb=np.ascontiguousarray(c.image_rgb.transpose(2, 0, 1))), "channels last"),
    (lambda c: dataclasses.replace(c, image_rgb=c.image_rgb[:50]), "calibration is for 96 x 72"),
    (lambda c: dataclasses.replace(c, image_rgb=c.image_rgb.astype(np.float32) / 255), "uint8"),
    (_sky, "behind the camera"),
])
def test_a_bad_camera_frame_is_refused_by_name_and_counted(detector: BevDetector, bad, says: str) -> None:
    node = _node(detector, lambda camera: (bad(camera),))
    assert node.compute(0, 0) is not None  # a good first frame: the camera's size is known from here on
    assert node.compute(1, 1) is None  # its only camera refused: nothing to send
    report = node.report()
    assert report["camera_refused"] == {"camera0": 1} and report["frames_refused"] == 1
    assert "'-1/camera0'" in report["last_camera_error"] and says in report["last_camera_error"]
    assert node.compute(2, 2) is None and node.report()["camera_refused"] == {"camera0": 2}


def test_a_refused_camera_leaves_the_agent_s_other_cameras_alone(detector: BevDetector) -> None:
    alone = _node(detector, lambda camera: (camera,))
    beside_a_bad_one = _node(detector, lambda camera: (dataclasses.replace(_sky(camera), name="camera1"), camera))
    for node in (alone, beside_a_bad_one):
        node.compute(0, 0)
    expected = _features(alone.compute(1, 1), detector)
    got = _features(beside_a_bad_one.compute(1, 1), detector)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)  # nothing lifted from the refused camera
    assert beside_a_bad_one.report()["camera_refused"] == {"camera1": 1}


def test_a_camera_sensor_needs_a_detector_with_a_camera_path() -> None:
    lidar_only = build_detector(DetectorConfig(grid=GRID))
    config = AgentNodeConfig(agent_id=-1, source=SourceConfig(kind="crossing", crossing=CROSSING), codec=None,
                             sensor="camera")
    with pytest.raises(ValueError, match="no camera path"):
        AgentNode(config, lidar_only, None, FrameSource(config.source, config.agent_id))
