"""From sensor records (agents) to detector samples (models): frames, ground truth, ranges."""

from __future__ import annotations

import numpy as np

from agents import SceneFrame
from agents.frames import ObjectClass
from agents.node import ground_points, ground_pose
from agents.visibility import points_on_boxes
from models.bev import BevGrid, aligned_bev_frame
from models.camera import CameraInputError, check_image
from models.cooperative import CameraViews, CoopSample
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


def camera_agent_indices(agent_count: int, camera_agents: int) -> list[int]:
    """Which agents of a sample (index 0 the ego, then the others by id) sense with cameras in the mixed
    setting: the last ``camera_agents`` (the ego only when every agent does: vehicles with cameras only)."""
    if not 0 <= camera_agents <= agent_count:
        raise ValueError(f"camera_agents={camera_agents}: the sample has {agent_count} agents")
    return list(range(agent_count - camera_agents, agent_count))


def mixed_sample(frame: SceneFrame, grid: BevGrid, lattice_m: float, camera_agents: int) -> CoopSample:
    """:func:`coop_sample` with the last ``camera_agents`` agents (see :func:`camera_agent_indices`) sensing
    with their cameras instead of their LiDAR: their points are left out and their images and calibrations
    put in. Ground truth is :func:`coop_sample`'s (vehicles in the ego's grid with a LiDAR point of some
    agent on them, that agent streaming LiDAR or not), so a run with and without the camera agents is scored
    on the same objects; a camera agent's own is what its LiDAR would see (its view, occlusion included).

    Raises:
        ValueError: more camera agents than agents.
        CameraInputError: a camera agent without cameras, or with a bad image.
    """
    base = coop_sample(frame, grid, lattice_m)
    order = [frame.ego_id] + [a for a in sorted(frame.agents) if a != frame.ego_id]
    chosen = set(camera_agent_indices(len(order), camera_agents))
    points, cameras = [], []
    for k, agent_id in enumerate(order):
        agent = frame.agents[agent_id]
        if k not in chosen:
            points.append(base.points[k])
            cameras.append(None)
            continue
        if not agent.cameras:
            raise CameraInputError(f"agent {agent_id} is a camera agent but has no cameras (world.camera.count is 0)")
        _, bev_from_ground = aligned_bev_frame(ground_pose(agent), lattice_m)
        points.append(np.zeros((0, 4), np.float32))
        cameras.append(camera_views(agent, bev_from_ground))
    return CoopSample(points=tuple(points), ego_from_agent=base.ego_from_agent, gt_boxes=base.gt_boxes,
                      agent_gt_boxes=base.agent_gt_boxes, cameras=tuple(cameras))


def camera_views(agent, bev_from_ground: np.ndarray) -> CameraViews:
    """An agent's camera images and calibrations, each camera placed in the agent's BEV frame.

    Raises:
        CameraInputError: a camera's image is missing or is not ``[H, W, 3]`` uint8 of its calibration's size.
    """
    ground_from_lidar = np.eye(4)
    ground_from_lidar[2, 3] = agent.world_from_lidar[2, 3]  # the ground frame sits under the sensor frame
    images = []
    for camera in agent.cameras:
        if camera.image_rgb is None:
            raise CameraInputError(f"camera {camera.name!r} of agent {agent.agent_id}: no image")
        height, width = agent.cameras[0].image_rgb.shape[:2]
        images.append(check_image(f"{agent.agent_id}/{camera.name}", camera.image_rgb, height, width))
    return CameraViews(names=tuple(f"{agent.agent_id}/{c.name}" for c in agent.cameras), images=np.stack(images),
                       intrinsics=np.stack([c.intrinsic for c in agent.cameras]),
                       bev_from_camera=np.stack([bev_from_ground @ ground_from_lidar @ c.lidar_from_camera
                                                 for c in agent.cameras]))


def in_view(views: CameraViews, boxes: np.ndarray) -> np.ndarray:
    """``[M]`` bool: the boxes' ground points (in the agent's BEV frame) fall inside some camera's image."""
    seen = np.zeros(len(boxes), dtype=bool)
    if not len(boxes):
        return seen
    feet = np.column_stack([boxes[:, :2], np.zeros(len(boxes)), np.ones(len(boxes))])
    for image, intrinsic, bev_from_camera in zip(views.images, views.intrinsics, views.bev_from_camera, strict=True):
        in_camera = (invert_se3(bev_from_camera) @ feet.T)[:3]
        depth = in_camera[2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u, v = (intrinsic @ in_camera)[:2] / depth
        seen |= (depth > 0.1) & (u >= 0) & (u < image.shape[1]) & (v >= 0) & (v < image.shape[0])
    return seen


def camera_sample(frame: SceneFrame, grid: BevGrid, lattice_m: float,
                  object_class: ObjectClass = ObjectClass.PEDESTRIAN, area_half_m: float | None = None) -> CoopSample:
    """Like :func:`coop_sample` for camera agents (and LiDAR agents beside them): each camera agent's images
    and calibration in its BEV frame, no points. Ground truth: every object of ``object_class`` in the ego's
    grid (within ``area_half_m`` of the world's origin when given: the area watched); an agent's own, those
    whose ground point one of its cameras sees (in front of it and inside its image, hidden or not)."""
    order = [frame.ego_id] + [a for a in sorted(frame.agents) if a != frame.ego_id]
    agents = [frame.agents[a] for a in order]
    frames = [aligned_bev_frame(ground_pose(a), lattice_m) for a in agents]
    ego_from_world = invert_se3(frames[0][0])
    ego_from_agent = np.stack([ego_from_world @ world_from_bev for world_from_bev, _ in frames])
    true_bev_from_world = [invert_se3(ground_pose(a, true=True) @ invert_se3(bev_from_ground))
                           for a, (_, bev_from_ground) in zip(agents, frames)]
    objects = [o for o in frame.objects().values() if o.object_class == object_class and o.object_id != frame.ego_id]
    boxes_world = np.stack([o.box_world for o in objects]) if objects else np.zeros((0, 7))
    if area_half_m is not None:
        boxes_world = boxes_world[np.all(np.abs(boxes_world[:, :2]) <= area_half_m, axis=1)]
    gt = transform_boxes(true_bev_from_world[0], boxes_world)
    points, cameras, agent_gt = [], [], []
    for k, (agent, (_, bev_from_ground)) in enumerate(zip(agents, frames)):
        own = transform_boxes(true_bev_from_world[k], boxes_world)
        if agent.cameras and not len(agent.points):
            views = camera_views(agent, bev_from_ground)
            own = own[in_view(views, own)]
            cameras.append(views)
            points.append(np.zeros((0, 4), np.float32))
        else:
            cameras.append(None)
            points.append(transform_points(bev_from_ground, ground_points(agent)).astype(np.float32))
        agent_gt.append(own[grid.contains(own[:, :2])])
    return CoopSample(points=tuple(points), ego_from_agent=ego_from_agent, gt_boxes=gt[grid.contains(gt[:, :2])],
                      agent_gt_boxes=tuple(agent_gt), cameras=tuple(cameras))
