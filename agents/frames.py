"""Per-frame sensor records shared by the synthetic world and dataset readers.

These are the values an agent's sensor source hands to the agent loop: one
:class:`SceneFrame` per time step, holding one :class:`AgentFrame` per agent.
All are frozen, slotted dataclasses: they are created once per frame and never
mutated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np


class ObjectClass(str, Enum):
    """Ground-truth object classes (the values are the names written to disk)."""

    VEHICLE = "vehicle"
    PEDESTRIAN = "pedestrian"


class AgentKind(str, Enum):
    """What carries the sensors: a moving vehicle or a fixed roadside unit."""

    VEHICLE = "vehicle"
    ROADSIDE_UNIT = "rsu"


@dataclass(frozen=True, slots=True)
class ObjectState:
    """One ground-truth object.

    Attributes:
        object_id: stable id across frames (an agent vehicle keeps its agent id).
        object_class: vehicle or pedestrian.
        box_world: ``[7]`` centre x, y, z, length, width, height (m), yaw (rad).
        speed_mps: speed along the heading.
    """

    object_id: int
    object_class: ObjectClass
    box_world: np.ndarray  # [7]
    speed_mps: float = 0.0


@dataclass(frozen=True, slots=True)
class CameraImage:
    """One pinhole camera's image and calibration.

    Attributes:
        name: ``camera0`` … ``camera3`` (front, right, left, back).
        image_rgb: ``[H, W, 3]`` uint8, or ``None`` when not loaded.
        intrinsic: ``[3, 3]`` pinhole matrix (pixels).
        lidar_from_camera: ``[4, 4]`` from the OpenCV camera frame (x right,
            y down, z forward) to the agent's LiDAR frame, as reported (may be noisy).
        true_lidar_from_camera: the exact one, when known (synthetic data).
    """

    name: str
    image_rgb: np.ndarray | None  # [H, W, 3] uint8
    intrinsic: np.ndarray  # [3, 3]
    lidar_from_camera: np.ndarray  # [4, 4]
    true_lidar_from_camera: np.ndarray | None = None  # [4, 4]


@dataclass(frozen=True, slots=True)
class AgentFrame:
    """What one agent sensed at one time step.

    Attributes:
        agent_id: integer id; roadside units are negative and never the ego.
        kind: vehicle or roadside unit.
        world_from_lidar: ``[4, 4]`` pose as the agent reports it (may be noisy).
        true_world_from_lidar: ``[4, 4]`` exact pose when known (synthetic data).
        points: ``[N, 4]`` float32 x, y, z (m, LiDAR frame), intensity in [0, 1].
        cameras: the agent's cameras (possibly none).
        objects: ground-truth objects listed for this agent, world frame.
        pose_covariance: ``[6, 6]`` covariance of the reported pose's (x, y, z, roll, pitch, yaw),
            as its GNSS/INS states it; ``None`` when unknown.
    """

    agent_id: int
    kind: AgentKind
    world_from_lidar: np.ndarray  # [4, 4]
    true_world_from_lidar: np.ndarray | None  # [4, 4]
    points: np.ndarray  # [N, 4]
    cameras: tuple[CameraImage, ...] = ()
    objects: tuple[ObjectState, ...] = ()
    pose_covariance: np.ndarray | None = None  # [6, 6]


@dataclass(frozen=True, slots=True)
class SceneFrame:
    """All agents at one time step of one scenario."""

    scenario: str
    frame_index: int
    timestamp_s: float
    agents: dict[int, AgentFrame] = field(default_factory=dict)

    @property
    def ego_id(self) -> int:
        """The ego: the smallest non-negative agent id (roadside units lead only where there is no vehicle,
        as at a crossing watched by pole cameras: then unit -1)."""
        if not self.agents:
            raise ValueError(f"{self.scenario} frame {self.frame_index}: no agent to be the ego")
        vehicles = [a for a in self.agents if a >= 0]
        return min(vehicles) if vehicles else max(self.agents)

    def objects(self) -> dict[int, ObjectState]:
        """Union of every agent's ground-truth objects, by object id."""
        union: dict[int, ObjectState] = {}
        for agent in self.agents.values():
            for obj in agent.objects:
                union.setdefault(obj.object_id, obj)
        return union
