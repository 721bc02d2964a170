"""Who sees what: the share of ground-truth objects near the ego that the ego
alone sees versus that any agent sees (the case for collaboration)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from agents.frames import AgentFrame, ObjectClass, SceneFrame
from models.boxes import count_points_in_boxes
from models.geometry import transform_points

GROUND_CLEARANCE_M = 0.2
"""Points this close to a box's bottom face are ground returns, not the object."""
SURFACE_MARGIN_M = 0.1
"""Boxes are grown by this much so that surface hits with range noise count."""


@dataclass(slots=True)
class _Tally:
    objects: int = 0
    ego_visible: int = 0
    union_visible: int = 0

    def as_dict(self) -> dict[str, float | int]:
        share = lambda n: round(100.0 * n / self.objects, 2) if self.objects else None  # noqa: E731
        ego, union = share(self.ego_visible), share(self.union_visible)
        return {"objects": self.objects, "ego_visible": self.ego_visible, "union_visible": self.union_visible,
                "ego_visible_pct": ego, "union_visible_pct": union,
                "gap_pct_points": None if ego is None else round(union - ego, 2)}


@dataclass(slots=True)
class VisibilityStats:
    """Object-frame counts over a scenario (an object seen in 10 frames counts 10 times)."""

    radius_m: float
    min_points: int
    frames: int = 0
    overall: _Tally = field(default_factory=_Tally)
    by_class: dict[str, _Tally] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"radius_m": self.radius_m, "min_points": self.min_points, "frames": self.frames,
                **self.overall.as_dict(), "by_class": {k: v.as_dict() for k, v in sorted(self.by_class.items())}}


def points_on_boxes(agent: AgentFrame, boxes_world: np.ndarray) -> np.ndarray:
    """LiDAR points ``[N]`` of ``agent`` that fall on each of ``boxes_world`` ``[N, 7]``."""
    world_from_lidar = agent.true_world_from_lidar if agent.true_world_from_lidar is not None else agent.world_from_lidar
    points_world = transform_points(world_from_lidar, agent.points)
    lifted = boxes_world[:, :7].copy()
    lifted[:, 2] += GROUND_CLEARANCE_M / 2
    lifted[:, 5] -= GROUND_CLEARANCE_M
    return count_points_in_boxes(points_world, lifted, margin_m=SURFACE_MARGIN_M)


def visibility_stats(frames: Iterable[SceneFrame], radius_m: float = 50.0, min_points: int = 5) -> VisibilityStats:
    """Count, per frame, objects within ``radius_m`` of the ego seen by the ego and by anyone.

    An object is seen by an agent when at least ``min_points`` of its LiDAR
    points fall on it. The ego's own vehicle is not an object of its scene.
    """
    stats = VisibilityStats(radius_m=radius_m, min_points=min_points)
    for frame in frames:
        stats.frames += 1
        ego = frame.agents[frame.ego_id]
        ego_xy = ego.world_from_lidar[:2, 3]
        objects = [o for o in frame.objects().values()
                   if o.object_id != frame.ego_id and np.linalg.norm(o.box_world[:2] - ego_xy) <= radius_m]
        if not objects:
            continue
        boxes = np.stack([o.box_world for o in objects])
        seen = {a: points_on_boxes(agent, boxes) >= min_points for a, agent in frame.agents.items()}
        union = np.logical_or.reduce(list(seen.values()))
        for k, obj in enumerate(objects):
            for tally in (stats.overall, stats.by_class.setdefault(ObjectClass(obj.object_class).value, _Tally())):
                tally.objects += 1
                tally.ego_visible += int(seen[frame.ego_id][k])
                tally.union_visible += int(union[k])
    return stats
