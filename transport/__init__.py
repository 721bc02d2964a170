"""Transport: framing of ``cp.v1`` messages and the gRPC links between agents and the fusion node."""

from transport.framing import (RAW_CODEC_ID, FramingError, GridSpec, boxes_from_proto, boxes_to_proto, feature_frame,
                               grid_from_proto, pose_from_proto, pose_to_proto, split_frame)
from transport.grpc_link import (AGENT_KEY, CHANNEL_OPTIONS, MAX_MESSAGE_BYTES, SERVER_OPTIONS, TOKEN_KEY,
                                 FeatureUplink, FusionServer, LinkError, MalformedFrame, TlsFiles, UplinkCounters,
                                 add_fusion_service, health_status, open_channel, start_fusion_server, subscribe,
                                 wait_serving)

__all__ = ["AGENT_KEY", "CHANNEL_OPTIONS", "MAX_MESSAGE_BYTES", "RAW_CODEC_ID", "SERVER_OPTIONS", "TOKEN_KEY",
           "FeatureUplink", "FramingError", "FusionServer", "GridSpec", "LinkError", "MalformedFrame", "TlsFiles",
           "UplinkCounters", "add_fusion_service", "boxes_from_proto", "boxes_to_proto", "feature_frame",
           "grid_from_proto", "health_status", "split_frame", "open_channel", "pose_from_proto", "pose_to_proto",
           "start_fusion_server", "subscribe", "wait_serving"]
