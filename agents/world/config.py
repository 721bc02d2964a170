"""Configuration of the synthetic world (pydantic, frozen, strict)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TownConfig(_Frozen):
    """Street grid and buildings."""

    blocks: int = Field(4, ge=1, le=12)
    """Blocks per side of the square street grid."""
    block_pitch_m: float = Field(80.0, ge=40.0, le=200.0)
    """Distance between neighbouring intersections."""
    building_height_m: tuple[float, float] = (6.0, 24.0)
    """Range of building heights."""
    empty_lot_share: float = Field(0.15, ge=0.0, le=1.0)
    """Share of building plots left open (car parks, squares)."""


class TrafficConfig(_Frozen):
    """Moving and parked road users, spawned around the agents."""

    moving_vehicles: int = Field(50, ge=0, le=400)
    """Vehicles driving on the lanes."""
    parked_vehicles: int = Field(100, ge=0, le=400)
    """Vehicles parked at the kerb (they occlude the pavement)."""
    pedestrians: int = Field(50, ge=0, le=400)
    """Pedestrians walking along the pavements."""
    spawn_radius_m: float = Field(110.0, ge=20.0)
    """Road users start within this distance of the ego's start."""
    truck_share: float = Field(0.25, ge=0.0, le=1.0)
    """Share of vehicles that are vans or trucks (large occluders)."""


class LidarConfig(_Frozen):
    """A spinning LiDAR, ray cast against the scene."""

    beams: int = Field(32, ge=1, le=128)
    """Vertical channels."""
    elevation_deg: tuple[float, float] = (-25.0, 10.0)
    """Lowest and highest beam elevation."""
    azimuth_steps: int = Field(1800, ge=64, le=8192)
    """Firings per revolution (1800 = 0.2 degrees)."""
    range_m: float = Field(100.0, ge=70.0, le=300.0)
    """Maximum range."""
    range_noise_m: float = Field(0.02, ge=0.0)
    """Standard deviation of the range error."""
    vehicle_mount_height_m: float = Field(1.9, gt=0.0)
    """LiDAR height above ground on vehicles."""
    rsu_mount_height_m: float = Field(5.0, gt=0.0)
    """LiDAR height above ground on roadside units."""


class CameraConfig(_Frozen):
    """Pinhole cameras rendered by ray casting the same scene."""

    count: int = Field(1, ge=0, le=4)
    """Cameras per agent: front, right, left, back in that order."""
    width_px: int = Field(400, ge=16, le=4096)
    height_px: int = Field(300, ge=16, le=4096)
    horizontal_fov_deg: float = Field(90.0, gt=10.0, lt=170.0)
    mount_height_m: float = Field(1.6, gt=0.0)
    """Camera height above ground on vehicles (roadside units: LiDAR height)."""


class NoiseConfig(_Frozen):
    """Errors added to what agents *report*; the truth is kept beside it."""

    pose_xy_m: float = Field(0.0, ge=0.0)
    """Standard deviation of the reported position, per frame."""
    pose_yaw_deg: float = Field(0.0, ge=0.0)
    """Standard deviation of the reported heading, per frame."""
    calibration_deg: float = Field(0.0, ge=0.0)
    """Standard deviation of a fixed camera-mount rotation error per camera."""
    lidar_mount_xy_m: float = Field(0.0, ge=0.0)
    """Size of a fixed error in where each agent believes its LiDAR sits (a direction drawn per agent):
    the reported pose is off by it in the agent's own frame, frame after frame."""
    lidar_mount_yaw_deg: float = Field(0.0, ge=0.0)
    """Size of a fixed heading error of each agent's LiDAR mount (a sign drawn per agent)."""


class WorldConfig(_Frozen):
    """A seeded scenario: town, traffic, agents and their sensors."""

    seed: int = Field(0, ge=0)
    """Everything in the world follows from it (numpy seeds must be non-negative)."""
    agents: int = Field(4, ge=2, le=8)
    """Agents in total; ids 0.. are vehicles, -1.. roadside units."""
    roadside_units: int | None = Field(None, ge=0, le=7)
    """How many of the agents are roadside units; default one per four agents (at least one)."""
    frames: int = Field(100, ge=1)
    rate_hz: float = Field(10.0, gt=0.0)
    agent_spacing_m: tuple[float, float] = (15.0, 60.0)
    """Other agents start this far (min, max) from the ego."""
    town: TownConfig = TownConfig()
    traffic: TrafficConfig = TrafficConfig()
    lidar: LidarConfig = LidarConfig()
    camera: CameraConfig = CameraConfig()
    noise: NoiseConfig = NoiseConfig()

    @model_validator(mode="after")
    def _one_vehicle_at_least(self) -> "WorldConfig":
        if self.roadside_unit_count >= self.agents:
            raise ValueError(
                f"roadside_units={self.roadside_unit_count} leaves no vehicle agent among agents={self.agents}; "
                "at most agents-1 roadside units are allowed"
            )
        return self

    @property
    def roadside_unit_count(self) -> int:
        return self.roadside_units if self.roadside_units is not None else max(1, self.agents // 4)

    @property
    def vehicle_agents(self) -> int:
        return self.agents - self.roadside_unit_count
