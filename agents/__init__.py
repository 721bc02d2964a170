"""Agents: sensor sources (the synthetic world, OPV2V-layout datasets) and the agent node."""

from agents.frames import AgentFrame, AgentKind, CameraImage, ObjectClass, ObjectState, SceneFrame
from agents.node import (AgentNode, AgentNodeConfig, ClientTlsConfig, FrameSource, SourceConfig, bev_input,
                         ground_points, ground_pose, load_agent_node)
from agents.nuscenes import NuScenesCamera, NuScenesKeyframe, load_nuscenes_keyframe
from agents.odometry import LidarOdometry, OdometryConfig
from agents.opv2v import DatasetError, OPV2VDataset, Scenario, read_pcd, write_pcd, write_scene_frame
from agents.pose import CorrectionRefused, PoseCorrectionConfig, ReportedPose
from agents.visibility import VisibilityStats, visibility_stats
from agents.world import SyntheticWorld, WorldConfig

__all__ = ["AgentNode", "AgentNodeConfig", "ClientTlsConfig", "FrameSource", "SourceConfig", "bev_input",
           "ground_points", "ground_pose", "load_agent_node", "AgentFrame", "AgentKind", "CameraImage", "DatasetError", "OPV2VDataset", "ObjectClass", "ObjectState",
           "Scenario", "SceneFrame", "SyntheticWorld", "VisibilityStats", "WorldConfig", "read_pcd",
           "visibility_stats", "write_pcd", "write_scene_frame", "NuScenesCamera", "NuScenesKeyframe",
           "load_nuscenes_keyframe", "LidarOdometry", "OdometryConfig", "CorrectionRefused", "PoseCorrectionConfig",
           "ReportedPose"]
