"""Transport: framing of ``cp.v1.FeatureFrame`` messages (links, deadline buffer and rate control to come)."""

from transport.framing import (FramingError, GridSpec, boxes_from_proto, boxes_to_proto, feature_frame,
                               pose_from_proto, pose_to_proto)

__all__ = ["FramingError", "GridSpec", "boxes_from_proto", "boxes_to_proto", "feature_frame", "pose_from_proto",
           "pose_to_proto"]
