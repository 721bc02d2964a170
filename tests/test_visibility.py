"""Who sees what: visibility_stats on hand-built frames (no world, no ray casting)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from agents.frames import AgentFrame, AgentKind, ObjectClass, ObjectState, SceneFrame
from agents.visibility import visibility_stats
from models.geometry import invert_se3, se3_from_xyz_rpy, transform_points

CAR_NEAR = ObjectState(object_id=100, object_class=ObjectClass.VEHICLE,
                       box_world=np.array([20.0, 0.0, 0.75, 4.0, 2.0, 1.5, 0.0]))
CAR_FAR = ObjectState(object_id=101, object_class=ObjectClass.VEHICLE,
                      box_world=np.array([60.0, 0.0, 0.75, 4.0, 2.0, 1.5, 0.0]))
WALKER = ObjectState(object_id=102, object_class=ObjectClass.PEDESTRIAN,
                     box_world=np.array([0.0, 15.0, 0.875, 0.5, 0.6, 1.75, 0.0]))


def on_box(obj: ObjectState, count: int) -> np.ndarray:
    """``count`` world points ``[count, 3]`` on the side of a box facing -y, at mid height."""
    x, y, z, length, width, _, _ = obj.box_world
    xs = np.linspace(x - 0.4 * length, x + 0.4 * length, count)
    return np.column_stack([xs, np.full(count, y - width / 2), np.full(count, z)])


def ground_under(obj: ObjectState) -> np.ndarray:
    """Ground returns right under a box (they must not count as hits on it)."""
    x, y = obj.box_world[:2]
    return np.array([[x + dx, y + dy, 0.0] for dx in (-1.0, 0.0, 1.0) for dy in (-0.5, 0.5)])


def agent(agent_id: int, x_m: float, y_m: float, points_world: Sequence[np.ndarray] = (),
          objects: tuple[ObjectState, ...] = (), reported_offset_m: float = 0.0) -> AgentFrame:
    """An agent at (x, y) whose LiDAR saw ``points_world`` (given in the world frame)."""
    true_pose = se3_from_xyz_rpy(x_m, y_m, 1.9 if agent_id >= 0 else 5.0, 0.0, 0.0, 0.3)
    reported = true_pose.copy()
    reported[0, 3] += reported_offset_m
    xyz = np.concatenate([np.zeros((0, 3)), *points_world])
    points_lidar = transform_points(invert_se3(true_pose), xyz)
    intensity = np.full((len(xyz), 1), 0.5)
    return AgentFrame(agent_id=agent_id, kind=AgentKind.VEHICLE if agent_id >= 0 else AgentKind.ROADSIDE_UNIT,
                      world_from_lidar=reported, true_world_from_lidar=true_pose,
                      points=np.hstack([points_lidar, intensity]).astype(np.float32), objects=objects)


def scene(*agents: AgentFrame) -> SceneFrame:
    return SceneFrame(scenario="hand", frame_index=0, timestamp_s=0.0, agents={a.agent_id: a for a in agents})


def test_object_seen_only_by_another_agent() -> None:
    frame = scene(agent(0, 0.0, 0.0, [ground_under(CAR_NEAR)], objects=(CAR_NEAR,)),
                  agent(1, 30.0, -10.0, [on_box(CAR_NEAR, 10)], objects=(CAR_NEAR,)))
    stats = visibility_stats([frame], radius_m=50.0, min_points=5).as_dict()
    assert stats["frames"] == 1
    assert (stats["objects"], stats["ego_visible"], stats["union_visible"]) == (1, 0, 1)
    assert (stats["ego_visible_pct"], stats["union_visible_pct"], stats["gap_pct_points"]) == (0.0, 100.0, 100.0)
    assert stats["by_class"] == {"vehicle": {"objects": 1, "ego_visible": 0, "union_visible": 1,
                                             "ego_visible_pct": 0.0, "union_visible_pct": 100.0,
                                             "gap_pct_points": 100.0}}


def test_object_seen_by_the_ego_counts_for_both() -> None:
    frame = scene(agent(0, 0.0, 0.0, [on_box(CAR_NEAR, 10)], objects=(CAR_NEAR,)), agent(1, 30.0, -10.0))
    stats = visibility_stats([frame]).as_dict()
    assert (stats["ego_visible_pct"], stats["union_visible_pct"], stats["gap_pct_points"]) == (100.0, 100.0, 0.0)


def test_objects_beyond_the_radius_are_ignored() -> None:
    frame = scene(agent(0, 0.0, 0.0, [on_box(CAR_NEAR, 10), on_box(CAR_FAR, 10)], objects=(CAR_NEAR, CAR_FAR)),
                  agent(1, 30.0, -10.0))
    assert visibility_stats([frame], radius_m=50.0).overall.objects == 1
    assert visibility_stats([frame], radius_m=70.0).overall.objects == 2


def test_the_ego_is_never_its_own_object() -> None:
    ego_box = ObjectState(object_id=0, object_class=ObjectClass.VEHICLE,
                          box_world=np.array([0.0, 0.0, 0.75, 4.5, 1.9, 1.5, 0.3]))
    # Agent 1 sees the ego's car and lists it; it still is not an object of the ego's scene.
    frame = scene(agent(0, 0.0, 0.0), agent(1, 10.0, -10.0, [on_box(ego_box, 10)], objects=(ego_box, WALKER)))
    stats = visibility_stats([frame])
    assert stats.overall.objects == 1
    assert set(stats.by_class) == {"pedestrian"}
    assert stats.overall.union_visible == 0


@pytest.mark.parametrize(("points", "min_points", "seen"), [(4, 5, False), (5, 5, True), (4, 4, True)])
def test_min_points(points: int, min_points: int, seen: bool) -> None:
    frame = scene(agent(0, 0.0, 0.0, [on_box(CAR_NEAR, points), ground_under(CAR_NEAR)], objects=(CAR_NEAR,)),
                  agent(1, 30.0, -10.0))
    stats = visibility_stats([frame], min_points=min_points).overall
    assert (stats.ego_visible, stats.union_visible) == (int(seen), int(seen))


def test_a_roadside_unit_is_the_ego_only_without_vehicles() -> None:
    frame = scene(agent(-1, 25.0, -8.0, [on_box(CAR_NEAR, 10)], objects=(CAR_NEAR,)),
                  agent(3, 0.0, 0.0, objects=(CAR_NEAR,)))
    assert frame.ego_id == 3
    stats = visibility_stats([frame]).overall
    assert (stats.objects, stats.ego_visible, stats.union_visible) == (1, 0, 1)
    # Only roadside units (a crossing watched by pole cameras): unit -1 leads.
    assert scene(agent(-2, 10.0, 0.0), agent(-1, 0.0, 0.0)).ego_id == -1


def test_hits_are_placed_with_the_true_pose() -> None:
    # The helper reports a pose 3 m off; its points still fall on the box.
    frame = scene(agent(0, 0.0, 0.0, objects=(CAR_NEAR,)),
                  agent(1, 30.0, -10.0, [on_box(CAR_NEAR, 10)], objects=(CAR_NEAR,), reported_offset_m=3.0))
    assert visibility_stats([frame]).overall.union_visible == 1


def test_counts_add_up_over_frames() -> None:
    seen = scene(agent(0, 0.0, 0.0, [on_box(CAR_NEAR, 10)], objects=(CAR_NEAR, WALKER)), agent(1, 30.0, -10.0))
    empty = scene(agent(0, 0.0, 0.0), agent(1, 30.0, -10.0))
    stats = visibility_stats([seen, empty, seen]).as_dict()
    assert stats["frames"] == 3
    assert (stats["objects"], stats["ego_visible"], stats["union_visible"]) == (4, 2, 2)
    assert stats["ego_visible_pct"] == 50.0
    assert stats["by_class"]["pedestrian"]["ego_visible_pct"] == 0.0
    assert stats["by_class"]["vehicle"]["ego_visible_pct"] == 100.0


def test_no_objects_gives_no_percentages() -> None:
    stats = visibility_stats([scene(agent(0, 0.0, 0.0), agent(1, 30.0, -10.0))]).as_dict()
    assert stats["frames"] == 1 and stats["objects"] == 0
    assert stats["ego_visible_pct"] is None and stats["gap_pct_points"] is None
