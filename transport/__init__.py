"""Transport: framing and chunking of ``cp.v1`` messages, the gRPC, WebRTC and datagram (UDP) links between
agents and the fusion node, the receive-side deadline buffer, sender rate control and network impairment for tests."""

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

_WEBRTC = ("WebRtcServer", "WebRtcUplink", "WebRtcUplinkCounters")
__all__ += [*_WEBRTC, "AgentBuffer", "ChunkRefused", "DatagramServer", "DatagramUplink", "RateConfig",
            "RateController"]

from transport.datagram_link import DatagramServer, DatagramUplink  # noqa: E402
from transport.deadline import AgentBuffer, ChunkRefused  # noqa: E402
from transport.rate import RateConfig, RateController  # noqa: E402


def __getattr__(name: str):
    """The WebRTC link on first use: importing aiortc costs about a second, and gRPC-only nodes never need it."""
    if name in _WEBRTC:
        from transport import webrtc_link

        return getattr(webrtc_link, name)
    raise AttributeError(f"module 'transport' has no attribute {name!r}")
