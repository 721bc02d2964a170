"""A pedestrian crossing watched by static pole cameras (the multi-camera pedestrian setting).

A square plaza where streets meet, crossed by people walking between random destinations, seen by
4–7 calibrated cameras on poles around it, all looking at the plaza from a few metres up, with
overlapping views. People hide each other from some cameras and not from others: what one camera
misses another sees. Every pole is a roadside-unit agent with one camera and no LiDAR. As the cameras
of a site are surveyed against one ground plane, each pole reports the site's reference point (the
plaza's centre, on the ground, axes along the world's) as its pose and its camera's extrinsics
relative to it: the poles' BEV frames coincide and one grid around the plaza serves them all. Camera
agents fit the same :class:`~agents.frames.AgentFrame` as LiDAR agents. Everything follows from the seed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from pydantic import Field

from agents.frames import AgentFrame, AgentKind, CameraImage, ObjectClass, ObjectState, SceneFrame
from agents.world import sensors
from agents.world.config import _Frozen

PERSON_SIZE = (0.5, 0.6, 1.75)
"""Length, width, height of a person's box (as in the town's traffic)."""


class CrossingConfig(_Frozen):
    """The plaza, its people and its pole cameras."""

    seed: int = Field(0, ge=0)
    frames: int = Field(100, ge=1)
    rate_hz: float = Field(5.0, gt=0.0)
    cameras: int = Field(5, ge=1, le=8)
    """Pole cameras around the plaza (the setting has 4–7)."""
    people: int = Field(40, ge=0, le=300)
    half_size_m: float = Field(7.0, ge=4.0, le=40.0)
    """People walk in the square of this half size around the plaza's centre."""
    ring_radius_m: float = Field(12.0, gt=0.0)
    """Poles stand this far from the centre (angles spread evenly, jittered by the seed)."""
    pole_height_m: float = Field(5.0, gt=0.5, le=30.0)
    width_px: int = Field(400, ge=16, le=4096)
    height_px: int = Field(300, ge=16, le=4096)
    horizontal_fov_deg: float = Field(80.0, gt=10.0, lt=170.0)
    walk_speed_mps: tuple[float, float] = (0.8, 1.6)


def look_at(position: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``world_from_camera`` (OpenCV axes: x right, y down, z forward) at ``position`` looking at ``target``, no roll."""
    forward = (target - position) / np.linalg.norm(target - position)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, np.cross(forward, right), forward], axis=1)
    pose[:3, 3] = position
    return pose


class CrossingWorld:
    """The crossing scenario of a :class:`CrossingConfig`: ``SceneFrame`` s whose agents are the poles.

    Pole ``k`` is agent ``-(k + 1)`` (a roadside unit): its pose is the site's reference point (identity:
    the world's origin on the ground), and its one camera ``camera0``, on the pole's top, looks at a point
    near the centre; ``world_from_camera[agent]`` is where it is.
    """

    def __init__(self, config: CrossingConfig) -> None:
        self.config = config
        self.scenario = f"crossing_seed{config.seed}"
        rng = np.random.default_rng([config.seed, 8])
        self.intrinsic = sensors.pinhole_intrinsic(config.width_px, config.height_px, config.horizontal_fov_deg)
        self.agent_ids = tuple(-(k + 1) for k in range(config.cameras))
        self.world_from_camera: dict[int, np.ndarray] = {}
        spread = 2 * np.pi / config.cameras
        for k, agent_id in enumerate(self.agent_ids):
            angle = k * spread + rng.uniform(-0.2, 0.2) * spread
            xy = config.ring_radius_m * np.array([np.cos(angle), np.sin(angle)])
            aim = rng.uniform(-0.25, 0.25, 2) * config.half_size_m  # near the centre, not exactly at it
            self.world_from_camera[agent_id] = look_at(np.array([xy[0], xy[1], config.pole_height_m]),
                                                       np.array([aim[0], aim[1], 0.0]))
        self.boxes = _walk(config, rng)  # [F, P, 7]
        palette = np.random.default_rng([config.seed, 9])
        self._rgb = 0.15 + 0.7 * palette.random((config.people, 3))
        self._ids = np.arange(100, 100 + config.people)

    def __len__(self) -> int:
        return self.config.frames

    def __iter__(self) -> Iterator[SceneFrame]:
        for index in range(len(self)):
            yield self.frame(index)

    def frame(self, index: int) -> SceneFrame:
        """Every pole's image and the people at frame ``index``."""
        scene, objects = self._scene(index)
        agents = {agent_id: self._pole(agent_id, scene, objects) for agent_id in self.agent_ids}
        return SceneFrame(scenario=self.scenario, frame_index=index, timestamp_s=index / self.config.rate_hz,
                          agents=agents)

    def agent_frame(self, index: int, agent_id: int) -> AgentFrame:
        """One pole's frame ``index`` (only its camera rendered: what a pole's agent process needs)."""
        if agent_id not in self.world_from_camera:
            raise KeyError(f"agent {agent_id} is not a pole of this crossing (poles {list(self.agent_ids)})")
        return self._pole(agent_id, *self._scene(index))

    def _scene(self, index: int) -> tuple[sensors.Scene, tuple[ObjectState, ...]]:
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} outside 0..{len(self) - 1}")
        boxes = self.boxes[index]
        scene = sensors.build_scene(self.config.ring_radius_m + 300.0, np.zeros((0, 7)), boxes,
                                    np.full(len(boxes), sensors.PEDESTRIAN), self._ids, self._rgb)
        objects = tuple(ObjectState(object_id=int(i), object_class=ObjectClass.PEDESTRIAN, box_world=b.copy())
                        for i, b in zip(self._ids, boxes, strict=True))
        return scene, objects

    def _pole(self, agent_id: int, scene: sensors.Scene, objects: tuple[ObjectState, ...]) -> AgentFrame:
        mount = self.world_from_camera[agent_id]  # the site frame is the world's
        image = sensors.render_camera(scene, mount, self.intrinsic, self.config.width_px,
                                      self.config.height_px, self._ground_colour)
        camera = CameraImage(name="camera0", image_rgb=image, intrinsic=self.intrinsic.copy(),
                             lidar_from_camera=mount.copy(), true_lidar_from_camera=mount.copy())
        return AgentFrame(agent_id=agent_id, kind=AgentKind.ROADSIDE_UNIT, world_from_lidar=np.eye(4),
                          true_world_from_lidar=np.eye(4), points=np.zeros((0, 4), np.float32),
                          cameras=(camera,), objects=objects,
                          pose_covariance=np.zeros((6, 6)))  # a surveyed pole: its pose is exact, never corrected

    def _ground_colour(self, points: np.ndarray) -> np.ndarray:
        """Asphalt with zebra stripes on the four crossings and a paved plaza in the middle."""
        x, y = points[:, 0], points[:, 1]
        half = self.config.half_size_m
        colour = np.tile([0.30, 0.30, 0.32], (len(points), 1))
        plaza = (np.abs(x) < half * 0.6) & (np.abs(y) < half * 0.6)
        colour[plaza] = [0.58, 0.55, 0.50]
        inner, outer = half * 0.6, half
        band = (((np.abs(x) >= inner) & (np.abs(x) < outer) & (np.abs(y) < inner))
                | ((np.abs(y) >= inner) & (np.abs(y) < outer) & (np.abs(x) < inner)))
        stripes = band & (((np.where(np.abs(x) < half * 0.6, x, y) / 0.6).astype(np.int64) % 2) == 0)
        colour[stripes] = [0.85, 0.85, 0.82]
        return colour


def _walk(config: CrossingConfig, rng: np.random.Generator) -> np.ndarray:
    """``[F, P, 7]`` people walking to random destinations in the square, keeping a little apart."""
    half, count = config.half_size_m, config.people
    dt = 1.0 / config.rate_hz
    position = rng.uniform(-half, half, (count, 2))
    goal = rng.uniform(-half, half, (count, 2))
    speed = rng.uniform(*config.walk_speed_mps, count)
    heading = np.zeros(count)
    length, width, height = PERSON_SIZE
    out = np.zeros((config.frames, count, 7))
    for f in range(config.frames):
        out[f] = np.column_stack([position, np.full(count, height / 2), np.full(count, length),
                                  np.full(count, width), np.full(count, height), heading])
        to_goal = goal - position
        distance = np.linalg.norm(to_goal, axis=1)
        arrived = distance < 0.5
        goal[arrived] = rng.uniform(-half, half, (int(arrived.sum()), 2))
        velocity = speed[:, None] * to_goal / np.maximum(distance, 1e-6)[:, None]
        apart = position[:, None] - position[None]  # [P, P, 2] push away from anyone closer than 0.8 m
        gap = np.linalg.norm(apart, axis=-1) + np.eye(count) * 1e3
        push = np.where((gap < 0.8)[..., None], apart / np.maximum(gap, 1e-3)[..., None], 0.0).sum(axis=1)
        velocity += push * speed[:, None]
        position = np.clip(position + velocity * dt, -half, half)
        moving = np.linalg.norm(velocity, axis=1) > 1e-6
        heading[moving] = np.arctan2(velocity[moving, 1], velocity[moving, 0])
    return out
