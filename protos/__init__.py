"""The cpstream wire contract: protobuf messages and the ``cp.v1.Fusion`` service.

``cpstream.proto`` is the source of truth (its comments define frames, units and
the meaning of every field); the ``cpstream_pb2*`` modules are generated from it
by ``python -m protos.generate`` and committed. Import from here, not from the
generated modules, so that regeneration never changes the public surface.

Enum values are reached through their enum class, e.g.
``ObjectClass.OBJECT_CLASS_VEHICLE`` or ``ContributionStatus.Name(status)``.
"""

from pathlib import Path

from protos.cpstream_pb2 import (
    AgentContribution,
    BevGridSpec,
    Box3D,
    CameraCalibration,
    ContributionStatus,
    Control,
    FeatureDtype,
    FeatureFrame,
    FusedFrame,
    LidarCalibration,
    LinkReport,
    LinkStats,
    ObjectClass,
    Pose,
    SensorCalibration,
    StageTiming,
    SubscribeRequest,
    Tile,
    Transform4x4,
)
from protos.cpstream_pb2_grpc import FusionServicer, FusionStub, add_FusionServicer_to_server

#: The .proto file the generated modules were made from (shipped as package data).
PROTO_PATH: Path = Path(__file__).resolve().parent / "cpstream.proto"

__all__ = [
    "PROTO_PATH",
    # geometry and calibration
    "Pose",
    "Transform4x4",
    "CameraCalibration",
    "LidarCalibration",
    "SensorCalibration",
    # features and objects
    "BevGridSpec",
    "FeatureDtype",
    "Tile",
    "ObjectClass",
    "Box3D",
    # agent <-> fusion
    "FeatureFrame",
    "LinkReport",
    "Control",
    # fusion output
    "ContributionStatus",
    "AgentContribution",
    "LinkStats",
    "StageTiming",
    "FusedFrame",
    "SubscribeRequest",
    # service
    "FusionStub",
    "FusionServicer",
    "add_FusionServicer_to_server",
]
