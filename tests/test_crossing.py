"""The pole-camera crossing: seeded, overlapping views, people hiding each other from some cameras."""

from __future__ import annotations

import numpy as np
import pytest

from agents.frames import AgentKind, ObjectClass
from agents.world import sensors
from agents.world.crossing import CrossingConfig, CrossingWorld


@pytest.fixture(scope="module")
def world() -> CrossingWorld:
    return CrossingWorld(CrossingConfig(seed=3, frames=12, cameras=5, width_px=200, height_px=150))


def _pixels_per_person(world: CrossingWorld, index: int, agent_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of each person in the pole camera's image, ray cast (not projected): ``[P]`` with everyone
    there, and ``[P]`` with that person alone on the plaza."""
    agent = world.frame(index).agents[agent_id]
    camera = agent.cameras[0]
    world_from_camera = agent.world_from_lidar @ camera.lidar_from_camera
    np.testing.assert_allclose(world_from_camera, world.world_from_camera[agent_id])
    rays = sensors.o3d.t.geometry.RaycastingScene.create_rays_pinhole(
        sensors.o3d.core.Tensor(camera.intrinsic), sensors.o3d.core.Tensor(np.linalg.inv(world_from_camera)),
        world.config.width_px, world.config.height_px).numpy().reshape(-1, 6).astype(np.float64)
    directions = rays[:, 3:] / np.linalg.norm(rays[:, 3:], axis=1, keepdims=True)
    boxes = world.boxes[index]

    def count(people: np.ndarray) -> np.ndarray:
        scene = sensors.build_scene(300.0, np.zeros((0, 7)), boxes[people], np.full(len(people), sensors.PEDESTRIAN),
                                    people, np.ones((len(people), 3)))
        hit = sensors.cast(scene, rays[:, :3], directions).entity
        ids = scene.entity_id[hit[hit >= 0]]
        return np.bincount(ids[ids >= 0], minlength=len(boxes))

    together = count(np.arange(len(boxes)))
    alone = np.array([count(np.array([k]))[k] for k in range(len(boxes))])
    return together, alone


def test_the_crossing_is_seeded_and_its_poles_are_camera_only_roadside_units(world: CrossingWorld) -> None:
    again = CrossingWorld(world.config)
    np.testing.assert_array_equal(world.boxes, again.boxes)
    assert not np.array_equal(world.boxes, CrossingWorld(world.config.model_copy(update={"seed": 4})).boxes)
    frame = world.frame(2)
    assert sorted(frame.agents) == [-5, -4, -3, -2, -1]
    for agent in frame.agents.values():
        assert agent.kind is AgentKind.ROADSIDE_UNIT and len(agent.points) == 0 and len(agent.cameras) == 1
        assert agent.cameras[0].image_rgb.shape == (150, 200, 3)
        assert len(agent.objects) == 40 and all(o.object_class is ObjectClass.PEDESTRIAN for o in agent.objects)
    np.testing.assert_array_equal(frame.agents[-1].cameras[0].image_rgb, again.frame(2).agents[-1].cameras[0].image_rgb)
    # People walk (about 1 m/s at 5 Hz) and stay in the square.
    steps = np.linalg.norm(np.diff(world.boxes[:, :, :2], axis=0), axis=-1)
    assert 0.1 < np.median(steps) < 0.4
    assert np.abs(world.boxes[..., :2]).max() <= world.config.half_size_m


def test_the_views_overlap_and_people_hide_each_other(world: CrossingWorld) -> None:
    counts = [_pixels_per_person(world, 6, a) for a in world.agent_ids]
    assert all(np.all(together <= alone) for together, alone in counts)
    # Share of each person shown to each camera ([cameras, people]; 0 where the camera cannot see them at all).
    shown = np.array([together / np.maximum(alone, 1) for together, alone in counts])
    # Occlusion: a good share of person-camera pairs are more than half hidden behind other people ...
    assert np.mean(shown < 0.5) > 0.15
    assert np.all(np.mean(shown < 0.5, axis=1) > 0.05)  # ... from every camera
    # ... while the views overlap: nearly everyone is more than half visible to two cameras or more.
    assert np.mean(np.sum(shown > 0.5, axis=0) >= 2) > 0.8
