"""The synthetic world: a seeded town with traffic, sensed by ray casting."""

from agents.world.config import CameraConfig, LidarConfig, NoiseConfig, TownConfig, TrafficConfig, WorldConfig
from agents.world.world import SyntheticWorld

__all__ = ["CameraConfig", "LidarConfig", "NoiseConfig", "SyntheticWorld", "TownConfig", "TrafficConfig",
           "WorldConfig"]
