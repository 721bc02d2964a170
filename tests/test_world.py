"""The synthetic world: seeded determinism, ray-cast geometry, traffic structure, cameras, config.

Worlds here are small (360 LiDAR firings per beam, 64x48 images, a few dozen road users) so
that each frame renders in milliseconds.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from agents.frames import AgentKind, ObjectClass, SceneFrame
from agents.world import SyntheticWorld, WorldConfig, sensors
from models.boxes import count_points_in_boxes, points_in_boxes
from models.geometry import transform_points, yaw_from_matrix

SURFACE_MARGIN_M = 0.1
"""Range noise is 0.02 m (std): 5 sigma off the surface is still inside a box grown by this."""


def small_config(seed: int = 1, **overrides) -> WorldConfig:
    fields: dict = {
        "seed": seed,
        "frames": 3,
        "camera": {"count": 1, "width_px": 64, "height_px": 48},
        "lidar": {"azimuth_steps": 360},
        "traffic": {"moving_vehicles": 15, "parked_vehicles": 15, "pedestrians": 10},
    }
    fields.update(overrides)
    return WorldConfig(**fields)


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(small_config(seed=1))


# --- determinism ------------------------------------------------------------------------------


def assert_frames_identical(a: SceneFrame, b: SceneFrame) -> None:
    assert a.scenario == b.scenario
    assert a.timestamp_s == b.timestamp_s
    assert list(a.agents) == list(b.agents)
    for agent_id, left in a.agents.items():
        right = b.agents[agent_id]
        assert left.points.dtype == np.float32
        assert left.points.tobytes() == right.points.tobytes()
        assert np.array_equal(left.world_from_lidar, right.world_from_lidar)
        assert np.array_equal(left.true_world_from_lidar, right.true_world_from_lidar)
        assert [o.object_id for o in left.objects] == [o.object_id for o in right.objects]
        for lo, ro in zip(left.objects, right.objects):
            assert lo.object_class == ro.object_class
            assert np.array_equal(lo.box_world, ro.box_world)
        assert len(left.cameras) == len(right.cameras)
        for lc, rc in zip(left.cameras, right.cameras):
            assert lc.image_rgb.tobytes() == rc.image_rgb.tobytes()
            assert np.array_equal(lc.lidar_from_camera, rc.lidar_from_camera)


def test_same_seed_gives_byte_identical_frames_in_any_order() -> None:
    noisy = {"pose_xy_m": 0.3, "pose_yaw_deg": 0.5, "calibration_deg": 0.5}
    config = small_config(seed=4, camera={"count": 2, "width_px": 64, "height_px": 48}, noise=noisy)
    first, second = SyntheticWorld(config), SyntheticWorld(config)
    second.frame(2)  # rendering another frame first changes nothing: frames are rendered on demand
    assert_frames_identical(first.frame(1), second.frame(1))
    assert np.array_equal(first.traffic.boxes, second.traffic.boxes)
    assert np.array_equal(first.town.buildings, second.town.buildings)


def test_different_seed_gives_a_different_world() -> None:
    a = SyntheticWorld(small_config(seed=4)).frame(0).agents[0]
    b = SyntheticWorld(small_config(seed=5)).frame(0).agents[0]
    assert not np.array_equal(a.true_world_from_lidar, b.true_world_from_lidar)
    assert a.points.shape != b.points.shape or not np.array_equal(a.points, b.points)
    assert not np.array_equal(a.cameras[0].image_rgb, b.cameras[0].image_rgb)
    boxes_a = {o.object_id: o.box_world for o in a.objects}
    boxes_b = {o.object_id: o.box_world for o in b.objects}
    shared = boxes_a.keys() & boxes_b.keys()
    assert boxes_a.keys() != boxes_b.keys() or any(not np.array_equal(boxes_a[k], boxes_b[k]) for k in shared)


# --- ray casting ------------------------------------------------------------------------------


@pytest.mark.parametrize("agent_id", [0, 1, -1])
def test_lidar_hits_lie_on_what_they_hit(world: SyntheticWorld, agent_id: int) -> None:
    index, config = 1, world.config
    scene = world.scene(index, without_id=agent_id)
    world_from_lidar = world.true_world_from_lidar(index, agent_id)
    directions = sensors.lidar_directions(config.lidar.beams, config.lidar.elevation_deg, config.lidar.azimuth_steps)
    rng = np.random.default_rng([config.seed, index, agent_id + 100])  # the stream agent_frame draws from
    points, entity = sensors.scan_lidar(scene, world_from_lidar, directions, config.lidar.range_m,
                                        config.lidar.range_noise_m, rng)
    # The scan under test is the one the world hands out.
    assert np.array_equal(points, world.agent_frame(index, agent_id).points)

    kind = scene.entity_kind[entity]  # [N]
    points_world = transform_points(world_from_lidar, points)  # [N, 4]
    assert (kind == sensors.GROUND).sum() > 100
    assert (kind == sensors.BUILDING).sum() > 100
    assert (kind == sensors.VEHICLE).sum() > 10

    assert np.abs(points_world[kind == sensors.GROUND, 2]).max() < 0.1

    on_object = (kind == sensors.VEHICLE) | (kind == sensors.PEDESTRIAN)
    object_index = [world.traffic.index_of(i) for i in scene.entity_id[entity[on_object]]]
    boxes = world.traffic.boxes[index, object_index]  # [K, 7] the box each point hit
    inside = points_in_boxes(points_world[on_object], boxes, margin_m=SURFACE_MARGIN_M)  # [K, K]
    assert np.diagonal(inside).all()

    on_building = kind == sensors.BUILDING
    building_index = entity[on_building] - 1  # entity 0 is the ground, then the buildings in order
    inside = points_in_boxes(points_world[on_building], world.town.buildings, margin_m=SURFACE_MARGIN_M)
    assert inside[np.arange(len(building_index)), building_index].all()

    ranges_m = np.linalg.norm(points[:, :3], axis=1)
    assert ranges_m.max() <= config.lidar.range_m + SURFACE_MARGIN_M
    assert ((points[:, 3] >= 0.0) & (points[:, 3] <= 1.0)).all()


@pytest.mark.parametrize("agent_id", [0, 1])
def test_agent_never_sees_its_own_body(world: SyntheticWorld, agent_id: int) -> None:
    index = 2
    agent = world.agent_frame(index, agent_id)
    own_box = world.traffic.boxes[index, world.traffic.index_of(agent_id)][None]  # [1, 7]
    points_world = transform_points(agent.true_world_from_lidar, agent.points)
    assert count_points_in_boxes(points_world, own_box, margin_m=SURFACE_MARGIN_M).tolist() == [0]
    assert agent_id not in world.scene(index, without_id=agent_id).entity_id
    # ... while another agent does see it (it is in the scene, only left out of its own).
    other = world.agent_frame(index, 1 - agent_id)
    assert count_points_in_boxes(transform_points(other.true_world_from_lidar, other.points), own_box,
                                 margin_m=SURFACE_MARGIN_M)[0] > 0


# --- structure --------------------------------------------------------------------------------


@pytest.mark.parametrize(("agents", "roadside_units", "expected_ids"), [
    (4, None, (0, 1, 2, -1)),
    (6, 2, (0, 1, 2, 3, -1, -2)),
    (2, 0, (0, 1)),
])
def test_agent_ids_are_vehicles_then_roadside_units(agents: int, roadside_units: int | None,
                                                    expected_ids: tuple[int, ...]) -> None:
    world = SyntheticWorld(small_config(seed=2, agents=agents, roadside_units=roadside_units, frames=1,
                                        camera={"count": 0}))
    assert world.agent_ids == expected_ids
    frame = world.frame(0)
    assert tuple(frame.agents) == expected_ids
    assert frame.ego_id == 0
    for agent_id, agent in frame.agents.items():
        assert agent.agent_id == agent_id
        assert agent.kind == (AgentKind.VEHICLE if agent_id >= 0 else AgentKind.ROADSIDE_UNIT)


def test_roadside_lidar_is_mounted_higher_than_vehicle_lidar() -> None:
    world = SyntheticWorld(small_config(seed=2, agents=5, roadside_units=2))
    heights = {a: world.true_world_from_lidar(0, a)[2, 3] for a in world.agent_ids}
    vehicles = [h for a, h in heights.items() if a >= 0]
    roadside = [h for a, h in heights.items() if a < 0]
    assert vehicles == pytest.approx([world.config.lidar.vehicle_mount_height_m] * 3)
    assert roadside == pytest.approx([world.config.lidar.rsu_mount_height_m] * 2)
    assert min(roadside) > max(vehicles)


def test_agents_list_everyone_near_but_themselves(world: SyntheticWorld) -> None:
    frame = world.frame(0)
    range_m = world.config.lidar.range_m
    for agent_id, agent in frame.agents.items():
        listed = {o.object_id for o in agent.objects}
        assert agent_id not in listed
        xy = agent.true_world_from_lidar[:2, 3]
        for other_id in world.agent_ids:
            if other_id >= 0 and other_id != agent_id:
                other_xy = frame.agents[other_id].true_world_from_lidar[:2, 3]
                assert (other_id in listed) == (np.linalg.norm(other_xy - xy) <= range_m)


def test_boxes_stand_on_the_ground(world: SyntheticWorld) -> None:
    boxes = world.traffic.boxes  # [F, O, 7]
    np.testing.assert_allclose(boxes[..., 2], boxes[..., 5] / 2)
    np.testing.assert_allclose(world.town.buildings[:, 2], world.town.buildings[:, 5] / 2)
    assert (boxes[..., 3:6] > 0).all()
    assert len(np.unique(world.traffic.ids)) == len(world.traffic.ids)


def test_traffic_has_moving_and_parked_vehicles_and_walking_pedestrians(world: SyntheticWorld) -> None:
    traffic = world.traffic
    classes = np.array([c.value for c in traffic.classes])
    assert set(classes) == {ObjectClass.VEHICLE.value, ObjectClass.PEDESTRIAN.value}
    vehicle = classes == ObjectClass.VEHICLE.value
    parked = vehicle & (traffic.speeds_mps[0] == 0.0)
    moving = vehicle & (traffic.speeds_mps[0] > 0.0)
    assert parked.sum() == world.config.traffic.parked_vehicles
    assert moving.sum() >= world.config.traffic.moving_vehicles
    displacement_m = np.linalg.norm(traffic.boxes[-1, :, :2] - traffic.boxes[0, :, :2], axis=1)  # [O]
    assert (displacement_m[moving] > 0.1).any()
    # Parked vehicles do not move at all, in any frame.
    assert (traffic.boxes[:, parked] == traffic.boxes[0, parked]).all()
    assert (displacement_m[~vehicle] > 0.0).all()  # pedestrians always walk


def test_pose_noise_only_changes_the_reported_pose() -> None:
    clean = SyntheticWorld(small_config(seed=3, camera={"count": 0})).frame(0)
    for agent in clean.agents.values():
        assert np.array_equal(agent.world_from_lidar, agent.true_world_from_lidar)

    noisy = SyntheticWorld(small_config(seed=3, camera={"count": 0},
                                        noise={"pose_xy_m": 0.5, "pose_yaw_deg": 1.0})).frame(0)
    for agent_id, agent in noisy.agents.items():
        assert np.array_equal(agent.true_world_from_lidar, clean.agents[agent_id].true_world_from_lidar)
        assert np.array_equal(agent.points, clean.agents[agent_id].points)  # the sensor saw the same
        offset_m = agent.world_from_lidar[:3, 3] - agent.true_world_from_lidar[:3, 3]
        assert 0.0 < np.linalg.norm(offset_m) < 5 * 0.5 * np.sqrt(2)
        assert offset_m[2] == 0.0
        assert yaw_from_matrix(agent.world_from_lidar) != pytest.approx(yaw_from_matrix(agent.true_world_from_lidar))


def test_heading_noise_turns_the_agent_in_place() -> None:
    # A heading error must not move the reported position (agents are ~100 m from the world origin,
    # where a 2 degree turn about the origin would shift them by metres).
    frame = SyntheticWorld(small_config(seed=3, camera={"count": 0}, noise={"pose_yaw_deg": 2.0})).frame(0)
    for agent in frame.agents.values():
        np.testing.assert_allclose(agent.world_from_lidar[:3, 3], agent.true_world_from_lidar[:3, 3], atol=1e-9)
        yaw_error = yaw_from_matrix(agent.world_from_lidar) - yaw_from_matrix(agent.true_world_from_lidar)
        assert 0.0 < abs(yaw_error) < np.deg2rad(5 * 2.0)


def test_calibration_noise_only_changes_the_reported_camera_mount() -> None:
    frame = SyntheticWorld(small_config(seed=3, noise={"calibration_deg": 1.0})).frame(0)
    for agent in frame.agents.values():
        camera = agent.cameras[0]
        assert not np.allclose(camera.lidar_from_camera, camera.true_lidar_from_camera)
        # A pure rotation of the camera about its own centre.
        np.testing.assert_allclose(camera.lidar_from_camera[:3, 3], camera.true_lidar_from_camera[:3, 3])


# --- cameras ----------------------------------------------------------------------------------


def test_camera_sees_sky_above_and_ground_below() -> None:
    world = SyntheticWorld(small_config(seed=1, frames=1, camera={"count": 4, "width_px": 64, "height_px": 48}))
    agent = world.agent_frame(0, 0)
    assert [c.name for c in agent.cameras] == ["camera0", "camera1", "camera2", "camera3"]
    front = agent.cameras[0].image_rgb.astype(np.int64)  # [H, W, 3]
    assert front.shape == (48, 64, 3)
    blue_minus_red = front[..., 2] - front[..., 0]  # [H, W]
    # Sky is blue (B - R is about 0.3 to 0.4 of full scale); ground and buildings are not.
    assert (blue_minus_red[0] > 40).mean() > 0.5
    assert (blue_minus_red[-1] < 20).all()
    assert not np.array_equal(agent.cameras[0].image_rgb, agent.cameras[3].image_rgb)
    np.testing.assert_allclose(agent.cameras[0].intrinsic[:2, 2], [32.0, 24.0])


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    {"agents": 9},
    {"agents": 1},
    {"agents": 2, "roadside_units": 2},
    {"seed": -1},
    {"bogus": 1},
    {"lidar": {"bogus": 1}},
    {"camera": {"count": 5}},
])
def test_invalid_config_is_refused(fields: dict) -> None:
    with pytest.raises(ValidationError):
        WorldConfig(**fields)


def test_roadside_unit_error_names_the_fields() -> None:
    with pytest.raises(ValidationError, match="roadside_units=2.*agents=2"):
        WorldConfig(agents=2, roadside_units=2)


def test_config_is_frozen() -> None:
    config = WorldConfig()
    with pytest.raises(ValidationError):
        config.seed = 3  # type: ignore[misc]
