"""From sensor records (agents) to detector samples (models): frames, ground truth, ranges."""

from __future__ import annotations

import numpy as np

from agents import SceneFrame
from agents.frames import ObjectClass
from agents.node import ground_points, ground_pose
from agents.visibility import points_on_boxes
from models.bev import BevGrid, aligned_bev_frame
from models.cooperative import CoopSample
from models.geometry import invert_se3, transform_boxes, transform_points

MIN_POINTS_FOR_GT = 1
"""An object is ground truth when at least this many LiDAR points of some agent fall on it."""


def coop_sample(frame: SceneFrame, grid: BevGrid, lattice_m: float,
                object_class: ObjectClass = ObjectClass.VEHICLE) -> CoopSample:
    """The ego first, then the other agents by id; ground truth within the ego's grid that some agent sees.

    Every agent's points are in its BEV frame (:func:`models.bev.aligned_bev_frame`, from the pose
    it reports, on a lattice of ``lattice_m``: the detector's feature cell); ground truth is placed
    where those frames really are (with the true poses), so pose noise shows as misplaced evidence.
    """
    order = [frame.ego_id] + [a for a in sorted(frame.agents) if a != frame.ego_id]
    agents = [frame.agents[a] for a in order]
    frames = [aligned_bev_frame(ground_pose(a), lattice_m) for a in agents]  # (world_from_bev, bev_from_ground)
    ego_from_world = invert_se3(frames[0][0])
    ego_from_agent = np.stack([ego_from_world @ world_from_bev for world_from_bev, _ in frames])
    true_bev_from_world = [invert_se3(ground_pose(a, true=True) @ invert_se3(bev_from_ground))
                           for a, (_, bev_from_ground) in zip(agents, frames)]
    objects = [o for o in frame.objects().values() if o.object_class == object_class and o.object_id != frame.ego_id]
    boxes_world = np.stack([o.box_world for o in objects]) if objects else np.zeros((0, 7))
    seen_by = np.stack([points_on_boxes(a, boxes_world) >= MIN_POINTS_FOR_GT for a in agents])  # [A, M]
    gt = transform_boxes(true_bev_from_world[0], boxes_world)
    in_range = grid.contains(gt[:, :2]) if len(gt) else np.zeros(0, bool)
    agent_gt = []
    for k in range(len(agents)):
        own = transform_boxes(true_bev_from_world[k], boxes_world[seen_by[k]])
        agent_gt.append(own[grid.contains(own[:, :2])] if len(own) else own.reshape(0, 7))
    points = tuple(transform_points(bev_from_ground, ground_points(a)).astype(np.float32)
                   for a, (_, bev_from_ground) in zip(agents, frames))
    return CoopSample(points=points, ego_from_agent=ego_from_agent,
                      gt_boxes=gt[in_range & seen_by.any(axis=0)], agent_gt_boxes=tuple(agent_gt))
