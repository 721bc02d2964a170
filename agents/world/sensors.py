"""LiDAR and camera simulation by ray casting (open3d's RaycastingScene).

The scene is one triangle mesh: the ground plane, the buildings and every
road user's box. Each triangle remembers which entity it belongs to, so a ray
hit tells what was seen (used for intensity, colour and tests). An agent never
sees its own body: its box is left out of the scene it casts against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import open3d as o3d

from models.boxes import box_corners_3d

GROUND, BUILDING, VEHICLE, PEDESTRIAN = 0, 1, 2, 3
"""Entity kinds."""

_BOX_TRIANGLES = np.array([
    [0, 2, 1], [0, 3, 2],  # bottom
    [4, 5, 6], [4, 6, 7],  # top
    [0, 1, 5], [0, 5, 4],
    [1, 2, 6], [1, 6, 5],
    [2, 3, 7], [2, 7, 6],
    [3, 0, 4], [3, 4, 7],
], dtype=np.int64)
"""Triangles of a box whose corners are numbered as ``box_corners_3d`` numbers them."""

_INTENSITY = np.array([0.15, 0.35, 0.6, 0.45], dtype=np.float32)
"""Mean return intensity per entity kind."""


@dataclass(frozen=True, slots=True)
class Scene:
    """A ray-castable snapshot of the world.

    Attributes:
        raycaster: open3d scene holding one mesh.
        triangle_entity: ``[T]`` entity index of each triangle.
        entity_kind: ``[E]`` GROUND, BUILDING, VEHICLE or PEDESTRIAN.
        entity_id: ``[E]`` object id (vehicles, pedestrians), or -1.
        entity_rgb: ``[E, 3]`` base colour in [0, 1] (the ground's is unused).
    """

    raycaster: o3d.t.geometry.RaycastingScene
    triangle_entity: np.ndarray  # [T]
    entity_kind: np.ndarray  # [E]
    entity_id: np.ndarray  # [E]
    entity_rgb: np.ndarray  # [E, 3]


def box_mesh(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices ``[8N, 3]`` and triangles ``[12N, 3]`` of ``[N, 7]`` boxes."""
    corners = box_corners_3d(boxes).reshape(-1, 3)
    offsets = (np.arange(len(boxes)) * 8)[:, None, None]
    return corners, (_BOX_TRIANGLES[None] + offsets).reshape(-1, 3)


def build_scene(ground_half_m: float, buildings: np.ndarray, objects: np.ndarray, object_kinds: np.ndarray,
                object_ids: np.ndarray, rgb: np.ndarray) -> Scene:
    """One mesh of ground (a square of half size ``ground_half_m``), buildings and object boxes.

    ``rgb`` is ``[len(buildings) + len(objects), 3]``: the colour of each box.
    """
    g = ground_half_m
    verts = [np.array([[-g, -g, 0.0], [g, -g, 0.0], [g, g, 0.0], [-g, g, 0.0]])]
    tris = [np.array([[0, 1, 2], [0, 2, 3]])]
    tri_entity = [np.zeros(2, dtype=np.int64)]
    kinds, ids = [GROUND], [-1]
    all_boxes = np.concatenate([buildings, objects], axis=0)
    box_kinds = np.concatenate([np.full(len(buildings), BUILDING), object_kinds]).astype(np.int64)
    box_ids = np.concatenate([np.full(len(buildings), -1), object_ids]).astype(np.int64)
    if len(all_boxes):
        v, t = box_mesh(all_boxes)
        verts.append(v)
        tris.append(t + 4)
        tri_entity.append(np.repeat(np.arange(1, len(all_boxes) + 1), 12))
        kinds.extend(box_kinds.tolist())
        ids.extend(box_ids.tolist())
    raycaster = o3d.t.geometry.RaycastingScene()
    raycaster.add_triangles(o3d.core.Tensor(np.concatenate(verts).astype(np.float32)),
                            o3d.core.Tensor(np.concatenate(tris).astype(np.uint32)))
    return Scene(raycaster=raycaster, triangle_entity=np.concatenate(tri_entity),
                 entity_kind=np.asarray(kinds), entity_id=np.asarray(ids),
                 entity_rgb=np.concatenate([np.zeros((1, 3)), rgb.reshape(-1, 3)], axis=0))


@dataclass(frozen=True, slots=True)
class RayHits:
    """Result of casting ``[N]`` rays."""

    t_m: np.ndarray  # [N] distance along the (unit) ray, inf on a miss
    entity: np.ndarray  # [N] entity index, -1 on a miss
    normal: np.ndarray  # [N, 3] world-frame surface normal


def cast(scene: Scene, origins: np.ndarray, directions: np.ndarray) -> RayHits:
    """Cast rays ``[N, 3]`` from ``origins`` along unit ``directions`` (world frame)."""
    rays = np.concatenate([origins, directions], axis=1).astype(np.float32)
    out = scene.raycaster.cast_rays(o3d.core.Tensor(rays))
    t = out["t_hit"].numpy().astype(np.float64)
    prim = out["primitive_ids"].numpy().astype(np.int64)
    hit = np.isfinite(t)
    entity = np.full(len(t), -1, dtype=np.int64)
    entity[hit] = scene.triangle_entity[prim[hit]]
    return RayHits(t_m=t, entity=entity, normal=out["primitive_normals"].numpy())


def lidar_directions(beams: int, elevation_deg: tuple[float, float], azimuth_steps: int) -> np.ndarray:
    """Unit ray directions ``[beams * azimuth_steps, 3]`` in the LiDAR frame (x forward, z up)."""
    elevation = np.deg2rad(np.linspace(elevation_deg[0], elevation_deg[1], beams))
    azimuth = np.linspace(-np.pi, np.pi, azimuth_steps, endpoint=False)
    el, az = np.meshgrid(elevation, azimuth, indexing="ij")
    return np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=-1).reshape(-1, 3)


def scan_lidar(scene: Scene, world_from_lidar: np.ndarray, directions_lidar: np.ndarray, range_m: float,
               range_noise_m: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One revolution.

    Returns:
        points ``[N, 4]`` float32 (x, y, z in the LiDAR frame, intensity) and
        the entity index ``[N]`` each point hit.
    """
    directions_world = directions_lidar @ world_from_lidar[:3, :3].T
    origins = np.broadcast_to(world_from_lidar[:3, 3], directions_world.shape)
    hits = cast(scene, origins, directions_world)
    keep = hits.t_m <= range_m
    t = hits.t_m[keep] + rng.normal(0.0, range_noise_m, int(keep.sum()))
    xyz = directions_lidar[keep] * t[:, None]
    entity = hits.entity[keep]
    intensity = _INTENSITY[scene.entity_kind[entity]] + rng.uniform(-0.1, 0.1, len(entity)).astype(np.float32)
    points = np.concatenate([xyz, np.clip(intensity, 0.0, 1.0)[:, None]], axis=1).astype(np.float32)
    return points, entity


def pinhole_intrinsic(width_px: int, height_px: int, horizontal_fov_deg: float) -> np.ndarray:
    """``[3, 3]`` pinhole matrix with square pixels and a centred principal point."""
    focal = (width_px / 2) / np.tan(np.deg2rad(horizontal_fov_deg) / 2)
    return np.array([[focal, 0.0, width_px / 2], [0.0, focal, height_px / 2], [0.0, 0.0, 1.0]])


def render_camera(scene: Scene, world_from_camera: np.ndarray, intrinsic: np.ndarray, width_px: int,
                  height_px: int, ground_colour: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Render ``[H, W, 3]`` uint8 RGB from an OpenCV-convention camera (z forward, y down).

    ``ground_colour`` maps world hit points ``[N, 3]`` on the ground to
    ``[N, 3]`` colours (roads, markings, pavements).
    """
    rays = o3d.t.geometry.RaycastingScene.create_rays_pinhole(
        o3d.core.Tensor(intrinsic), o3d.core.Tensor(np.linalg.inv(world_from_camera)), width_px, height_px)
    rays = rays.numpy().reshape(-1, 6).astype(np.float64)
    directions = rays[:, 3:] / np.linalg.norm(rays[:, 3:], axis=1, keepdims=True)
    hits = cast(scene, rays[:, :3], directions)
    hit = hits.entity >= 0
    rgb = np.empty((len(directions), 3))
    # Sky: brighter towards the horizon.
    rgb[~hit] = np.array([0.45, 0.62, 0.85]) + 0.25 * (1 - np.clip(directions[~hit, 2:3], 0, 1))
    base = scene.entity_rgb[hits.entity[hit]]
    is_ground = scene.entity_kind[hits.entity[hit]] == GROUND
    points = rays[hit, :3] + directions[hit] * hits.t_m[hit, None]
    base[is_ground] = ground_colour(points[is_ground])
    sun = np.array([0.4, 0.3, 0.87])
    shade = 0.45 + 0.55 * np.clip(np.abs(hits.normal[hit] @ sun), 0.0, 1.0)
    rgb[hit] = base * shade[:, None]
    return (np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8).reshape(height_px, width_px, 3)
