"""Fusion: the fusion node (receive, check, decode, warp, merge, detect, publish)."""

from fusion.node import (
           AgentState,
           FusionConfig,
           FusionNode,
           TlsConfig,
           load_fusion_node,
)
from fusion.alignment import CorrectionConfig, PoseCorrector, PoseFilter, PoseHistory
from fusion.calibration import AgentCalibration, CalibrationError, CameraModel, LidarModel, PoseEstimate
from fusion.receive import Contribution, FrameRefused, decode_frame, expected_grid

__all__ = ["AgentCalibration", "AgentState", "CalibrationError", "CameraModel", "Contribution", "CorrectionConfig",
           "FrameRefused", "FusionConfig", "FusionNode", "LidarModel", "PoseCorrector", "PoseEstimate", "PoseFilter",
           "PoseHistory", "TlsConfig", "decode_frame", "expected_grid", "load_fusion_node"]
