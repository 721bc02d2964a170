"""The synthetic world: a seeded town with traffic, sensed by 2 to 8 agents."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from agents.frames import AgentFrame, AgentKind, CameraImage, ObjectClass, ObjectState, SceneFrame
from agents.opv2v import CORDS_FROM_CV
from agents.world import sensors
from agents.world.config import WorldConfig
from agents.world.town import KERB_M, PLOT_START_M, Town, build_town
from agents.world.traffic import TrafficLog, simulate_traffic
from models.geometry import perturb_extrinsic, perturb_pose, se3_from_xyz_rpy

CAMERA_YAWS_DEG = (0.0, -90.0, 90.0, 180.0)
"""camera0 … camera3 look front, right, left, back."""
_KIND_OF_CLASS = {ObjectClass.VEHICLE: sensors.VEHICLE, ObjectClass.PEDESTRIAN: sensors.PEDESTRIAN}


class SyntheticWorld:
    """A scenario generated from a :class:`WorldConfig`.

    Everything (town, traffic, sensor noise) follows from ``config.seed``; a
    frame is rendered on demand and is the same whenever it is asked for.
    Rendering one agent-frame (LiDAR and one camera) takes tens of milliseconds.
    """

    def __init__(self, config: WorldConfig) -> None:
        self.config = config
        rng = np.random.default_rng(config.seed)
        self.town: Town = build_town(config.town, rng)
        self.traffic: TrafficLog = simulate_traffic(self.town, config, rng)
        self.scenario = f"synthetic_seed{config.seed}"
        self.agent_ids: tuple[int, ...] = tuple(range(config.vehicle_agents)) + tuple(
            -(k + 1) for k in range(config.roadside_unit_count))
        self._directions = sensors.lidar_directions(
            config.lidar.beams, config.lidar.elevation_deg, config.lidar.azimuth_steps)
        self._intrinsic = sensors.pinhole_intrinsic(
            config.camera.width_px, config.camera.height_px, config.camera.horizontal_fov_deg)
        self._object_kinds = np.array([_KIND_OF_CLASS[c] for c in self.traffic.classes])
        palette = np.random.default_rng([config.seed, 3])
        self._building_rgb = 0.45 + 0.35 * palette.random((len(self.town.buildings), 3)) * [1.0, 0.8, 0.6]
        self._object_rgb = np.where((self._object_kinds == sensors.PEDESTRIAN)[:, None],
                                    0.2 + 0.5 * palette.random((len(self._object_kinds), 3)),
                                    0.15 + 0.8 * palette.random((len(self._object_kinds), 3)))
        noise = config.noise
        self._pose_covariance = np.diag([noise.pose_xy_m ** 2, noise.pose_xy_m ** 2, 0.0, 0.0, 0.0,
                                         np.deg2rad(noise.pose_yaw_deg) ** 2])  # what the agents' INS states
        self._mount_error = {a: perturb_extrinsic(np.eye(4), noise.lidar_mount_xy_m, noise.lidar_mount_yaw_deg,
                                                  np.random.default_rng([config.seed, 11, a + 100])) for a in self.agent_ids}
        self._calibration_error = {
            (a, c): _small_rotation(np.random.default_rng([config.seed, 7, a + 100, c]), config.noise.calibration_deg)
            for a in self.agent_ids for c in range(config.camera.count)}

    def __len__(self) -> int:
        return self.config.frames

    def __iter__(self) -> Iterator[SceneFrame]:
        for index in range(len(self)):
            yield self.frame(index)

    def frame(self, index: int) -> SceneFrame:
        """All agents' sensor data at frame ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} outside 0..{len(self) - 1}")
        agents = {a: self.agent_frame(index, a) for a in self.agent_ids}
        return SceneFrame(scenario=self.scenario, frame_index=index, timestamp_s=index / self.config.rate_hz,
                          agents=agents)

    def true_world_from_lidar(self, index: int, agent_id: int) -> np.ndarray:
        """Exact ``[4, 4]`` LiDAR pose of an agent."""
        if agent_id < 0:
            x, y, yaw = self.traffic.rsu_poses[agent_id]
            return se3_from_xyz_rpy(x, y, self.config.lidar.rsu_mount_height_m, 0.0, 0.0, yaw)
        box = self.traffic.boxes[index, self.traffic.index_of(agent_id)]
        return se3_from_xyz_rpy(box[0], box[1], self.config.lidar.vehicle_mount_height_m, 0.0, 0.0, box[6])

    def scene(self, index: int, without_id: int | None = None) -> sensors.Scene:
        """The ray-castable scene at frame ``index``, leaving out object ``without_id``."""
        keep = self.traffic.ids != without_id
        lo, hi = self.town.extent_m
        rgb = np.concatenate([self._building_rgb, self._object_rgb[keep]], axis=0)
        return sensors.build_scene(max(abs(lo), abs(hi)) + 300.0, self.town.buildings,
                                   self.traffic.boxes[index][keep], self._object_kinds[keep],
                                   self.traffic.ids[keep], rgb)

    def agent_frame(self, index: int, agent_id: int) -> AgentFrame:
        """One agent's LiDAR sweep, camera images and ground truth at frame ``index``."""
        rng = np.random.default_rng([self.config.seed, index, agent_id + 100])
        scene = self.scene(index, without_id=agent_id)
        true_pose = self.true_world_from_lidar(index, agent_id)
        points, _ = sensors.scan_lidar(scene, true_pose, self._directions, self.config.lidar.range_m,
                                       self.config.lidar.range_noise_m, rng)
        return AgentFrame(
            agent_id=agent_id,
            kind=AgentKind.VEHICLE if agent_id >= 0 else AgentKind.ROADSIDE_UNIT,
            world_from_lidar=self._reported_pose(true_pose @ self._mount_error[agent_id], rng),
            true_world_from_lidar=true_pose,
            points=points,
            cameras=tuple(self._camera(scene, true_pose, agent_id, c) for c in range(self.config.camera.count)),
            objects=self._objects_near(index, true_pose[:2, 3], agent_id),
            pose_covariance=self._pose_covariance,
        )

    def _reported_pose(self, true_pose: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        noise = self.config.noise
        if noise.pose_xy_m == 0.0 and noise.pose_yaw_deg == 0.0:
            return true_pose.copy()
        return perturb_pose(true_pose, noise.pose_xy_m, noise.pose_yaw_deg, rng)

    def lidar_from_camera(self, agent_id: int, camera: int) -> np.ndarray:
        """Exact ``[4, 4]`` mount of camera ``camera`` (OpenCV axes) on the agent's LiDAR."""
        lidar_height = self.config.lidar.rsu_mount_height_m if agent_id < 0 else self.config.lidar.vehicle_mount_height_m
        camera_height = lidar_height if agent_id < 0 else self.config.camera.mount_height_m
        yaw = np.deg2rad(CAMERA_YAWS_DEG[camera])
        forward = 0.0 if agent_id < 0 else 0.5
        lidar_from_cords = se3_from_xyz_rpy(forward * np.cos(yaw), forward * np.sin(yaw),
                                            camera_height - lidar_height, 0.0, 0.0, yaw)
        return lidar_from_cords @ CORDS_FROM_CV

    def _camera(self, scene: sensors.Scene, world_from_lidar: np.ndarray, agent_id: int, camera: int) -> CameraImage:
        cfg = self.config.camera
        true_mount = self.lidar_from_camera(agent_id, camera)
        image = sensors.render_camera(scene, world_from_lidar @ true_mount, self._intrinsic, cfg.width_px,
                                      cfg.height_px, self._ground_colour)
        reported = true_mount @ self._calibration_error[(agent_id, camera)]
        return CameraImage(name=f"camera{camera}", image_rgb=image, intrinsic=self._intrinsic.copy(),
                           lidar_from_camera=reported, true_lidar_from_camera=true_mount)

    def _objects_near(self, index: int, xy: np.ndarray, agent_id: int) -> tuple[ObjectState, ...]:
        boxes = self.traffic.boxes[index]
        near = np.linalg.norm(boxes[:, :2] - xy, axis=1) <= self.config.lidar.range_m
        return tuple(
            ObjectState(object_id=int(self.traffic.ids[k]), object_class=self.traffic.classes[k],
                        box_world=boxes[k].copy(), speed_mps=float(self.traffic.speeds_mps[index, k]))
            for k in np.flatnonzero(near) if self.traffic.ids[k] != agent_id)

    def _ground_colour(self, points: np.ndarray) -> np.ndarray:
        offset = self.town.street_offset_m(points[:, :2])
        colour = np.tile([0.36, 0.48, 0.30], (len(points), 1))  # grass and plazas
        colour[offset < PLOT_START_M] = [0.62, 0.62, 0.60]  # pavement
        colour[offset < KERB_M] = [0.28, 0.28, 0.30]  # asphalt
        colour[offset < 0.12] = [0.85, 0.75, 0.20]  # centre line
        return colour


def _small_rotation(rng: np.random.Generator, std_deg: float) -> np.ndarray:
    if std_deg == 0.0:
        return np.eye(4)
    roll, pitch, yaw = np.deg2rad(rng.normal(0.0, std_deg, 3))
    return se3_from_xyz_rpy(0.0, 0.0, 0.0, roll, pitch, yaw)
