"""Fusion: the fusion node (receive, check, decode, warp, merge, detect, publish)."""

from fusion.node import (
           AgentState,
           FusionConfig,
           FusionNode,
           TlsConfig,
           load_fusion_node,
)
from fusion.receive import Contribution, FrameRefused, decode_frame, expected_grid

__all__ = ["AgentState", "Contribution", "FrameRefused", "FusionConfig", "FusionNode", "TlsConfig", "decode_frame",
           "expected_grid", "load_fusion_node"]
