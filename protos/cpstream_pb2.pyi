from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeatureDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEATURE_DTYPE_UNSPECIFIED: _ClassVar[FeatureDtype]
    FEATURE_DTYPE_FLOAT32: _ClassVar[FeatureDtype]
    FEATURE_DTYPE_FLOAT16: _ClassVar[FeatureDtype]
    FEATURE_DTYPE_BFLOAT16: _ClassVar[FeatureDtype]

class ObjectClass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OBJECT_CLASS_UNKNOWN: _ClassVar[ObjectClass]
    OBJECT_CLASS_VEHICLE: _ClassVar[ObjectClass]
    OBJECT_CLASS_PEDESTRIAN: _ClassVar[ObjectClass]
    OBJECT_CLASS_CYCLIST: _ClassVar[ObjectClass]

class ContributionStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTRIBUTION_STATUS_UNSPECIFIED: _ClassVar[ContributionStatus]
    CONTRIBUTION_STATUS_FRESH: _ClassVar[ContributionStatus]
    CONTRIBUTION_STATUS_LATE: _ClassVar[ContributionStatus]
    CONTRIBUTION_STATUS_PARTIAL: _ClassVar[ContributionStatus]
    CONTRIBUTION_STATUS_SUBSTITUTED: _ClassVar[ContributionStatus]
    CONTRIBUTION_STATUS_MISSING: _ClassVar[ContributionStatus]
FEATURE_DTYPE_UNSPECIFIED: FeatureDtype
FEATURE_DTYPE_FLOAT32: FeatureDtype
FEATURE_DTYPE_FLOAT16: FeatureDtype
FEATURE_DTYPE_BFLOAT16: FeatureDtype
OBJECT_CLASS_UNKNOWN: ObjectClass
OBJECT_CLASS_VEHICLE: ObjectClass
OBJECT_CLASS_PEDESTRIAN: ObjectClass
OBJECT_CLASS_CYCLIST: ObjectClass
CONTRIBUTION_STATUS_UNSPECIFIED: ContributionStatus
CONTRIBUTION_STATUS_FRESH: ContributionStatus
CONTRIBUTION_STATUS_LATE: ContributionStatus
CONTRIBUTION_STATUS_PARTIAL: ContributionStatus
CONTRIBUTION_STATUS_SUBSTITUTED: ContributionStatus
CONTRIBUTION_STATUS_MISSING: ContributionStatus

class Pose(_message.Message):
    __slots__ = ("x_m", "y_m", "z_m", "roll_rad", "pitch_rad", "yaw_rad", "covariance")
    X_M_FIELD_NUMBER: _ClassVar[int]
    Y_M_FIELD_NUMBER: _ClassVar[int]
    Z_M_FIELD_NUMBER: _ClassVar[int]
    ROLL_RAD_FIELD_NUMBER: _ClassVar[int]
    PITCH_RAD_FIELD_NUMBER: _ClassVar[int]
    YAW_RAD_FIELD_NUMBER: _ClassVar[int]
    COVARIANCE_FIELD_NUMBER: _ClassVar[int]
    x_m: float
    y_m: float
    z_m: float
    roll_rad: float
    pitch_rad: float
    yaw_rad: float
    covariance: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, x_m: _Optional[float] = ..., y_m: _Optional[float] = ..., z_m: _Optional[float] = ..., roll_rad: _Optional[float] = ..., pitch_rad: _Optional[float] = ..., yaw_rad: _Optional[float] = ..., covariance: _Optional[_Iterable[float]] = ...) -> None: ...

class Transform4x4(_message.Message):
    __slots__ = ("row_major",)
    ROW_MAJOR_FIELD_NUMBER: _ClassVar[int]
    row_major: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, row_major: _Optional[_Iterable[float]] = ...) -> None: ...

class CameraCalibration(_message.Message):
    __slots__ = ("name", "width_px", "height_px", "intrinsic", "agent_from_camera")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    INTRINSIC_FIELD_NUMBER: _ClassVar[int]
    AGENT_FROM_CAMERA_FIELD_NUMBER: _ClassVar[int]
    name: str
    width_px: int
    height_px: int
    intrinsic: _containers.RepeatedScalarFieldContainer[float]
    agent_from_camera: Transform4x4
    def __init__(self, name: _Optional[str] = ..., width_px: _Optional[int] = ..., height_px: _Optional[int] = ..., intrinsic: _Optional[_Iterable[float]] = ..., agent_from_camera: _Optional[_Union[Transform4x4, _Mapping]] = ...) -> None: ...

class LidarCalibration(_message.Message):
    __slots__ = ("agent_from_lidar", "beams", "range_m")
    AGENT_FROM_LIDAR_FIELD_NUMBER: _ClassVar[int]
    BEAMS_FIELD_NUMBER: _ClassVar[int]
    RANGE_M_FIELD_NUMBER: _ClassVar[int]
    agent_from_lidar: Transform4x4
    beams: int
    range_m: float
    def __init__(self, agent_from_lidar: _Optional[_Union[Transform4x4, _Mapping]] = ..., beams: _Optional[int] = ..., range_m: _Optional[float] = ...) -> None: ...

class SensorCalibration(_message.Message):
    __slots__ = ("lidar", "cameras")
    LIDAR_FIELD_NUMBER: _ClassVar[int]
    CAMERAS_FIELD_NUMBER: _ClassVar[int]
    lidar: LidarCalibration
    cameras: _containers.RepeatedCompositeFieldContainer[CameraCalibration]
    def __init__(self, lidar: _Optional[_Union[LidarCalibration, _Mapping]] = ..., cameras: _Optional[_Iterable[_Union[CameraCalibration, _Mapping]]] = ...) -> None: ...

class BevGridSpec(_message.Message):
    __slots__ = ("x_min_m", "x_max_m", "y_min_m", "y_max_m", "cell_size_m", "channels", "height_cells", "width_cells", "tile_size_cells")
    X_MIN_M_FIELD_NUMBER: _ClassVar[int]
    X_MAX_M_FIELD_NUMBER: _ClassVar[int]
    Y_MIN_M_FIELD_NUMBER: _ClassVar[int]
    Y_MAX_M_FIELD_NUMBER: _ClassVar[int]
    CELL_SIZE_M_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_CELLS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_CELLS_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_CELLS_FIELD_NUMBER: _ClassVar[int]
    x_min_m: float
    x_max_m: float
    y_min_m: float
    y_max_m: float
    cell_size_m: float
    channels: int
    height_cells: int
    width_cells: int
    tile_size_cells: int
    def __init__(self, x_min_m: _Optional[float] = ..., x_max_m: _Optional[float] = ..., y_min_m: _Optional[float] = ..., y_max_m: _Optional[float] = ..., cell_size_m: _Optional[float] = ..., channels: _Optional[int] = ..., height_cells: _Optional[int] = ..., width_cells: _Optional[int] = ..., tile_size_cells: _Optional[int] = ...) -> None: ...

class Tile(_message.Message):
    __slots__ = ("index", "payload", "crc32", "relevance")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    RELEVANCE_FIELD_NUMBER: _ClassVar[int]
    index: int
    payload: bytes
    crc32: int
    relevance: float
    def __init__(self, index: _Optional[int] = ..., payload: _Optional[bytes] = ..., crc32: _Optional[int] = ..., relevance: _Optional[float] = ...) -> None: ...

class Box3D(_message.Message):
    __slots__ = ("x_m", "y_m", "z_m", "length_m", "width_m", "height_m", "yaw_rad", "label", "score")
    X_M_FIELD_NUMBER: _ClassVar[int]
    Y_M_FIELD_NUMBER: _ClassVar[int]
    Z_M_FIELD_NUMBER: _ClassVar[int]
    LENGTH_M_FIELD_NUMBER: _ClassVar[int]
    WIDTH_M_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_M_FIELD_NUMBER: _ClassVar[int]
    YAW_RAD_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    x_m: float
    y_m: float
    z_m: float
    length_m: float
    width_m: float
    height_m: float
    yaw_rad: float
    label: ObjectClass
    score: float
    def __init__(self, x_m: _Optional[float] = ..., y_m: _Optional[float] = ..., z_m: _Optional[float] = ..., length_m: _Optional[float] = ..., width_m: _Optional[float] = ..., height_m: _Optional[float] = ..., yaw_rad: _Optional[float] = ..., label: _Optional[_Union[ObjectClass, str]] = ..., score: _Optional[float] = ...) -> None: ...

class FeatureFrame(_message.Message):
    __slots__ = ("agent_id", "session_id", "sequence", "capture_time_ns", "send_time_ns", "pose", "calibration", "grid", "codec_id", "rate_level", "feature_dtype", "tiles", "tile_count", "chunk_index", "chunk_count", "detections", "auth_token", "odometry", "pose_correction_sequence", "scan_blocks", "own_pose")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    SEND_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    POSE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    CODEC_ID_FIELD_NUMBER: _ClassVar[int]
    RATE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    TILE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ODOMETRY_FIELD_NUMBER: _ClassVar[int]
    POSE_CORRECTION_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SCAN_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    OWN_POSE_FIELD_NUMBER: _ClassVar[int]
    agent_id: int
    session_id: int
    sequence: int
    capture_time_ns: int
    send_time_ns: int
    pose: Pose
    calibration: SensorCalibration
    grid: BevGridSpec
    codec_id: str
    rate_level: int
    feature_dtype: FeatureDtype
    tiles: _containers.RepeatedCompositeFieldContainer[Tile]
    tile_count: int
    chunk_index: int
    chunk_count: int
    detections: _containers.RepeatedCompositeFieldContainer[Box3D]
    auth_token: str
    odometry: Pose
    pose_correction_sequence: int
    scan_blocks: _containers.RepeatedScalarFieldContainer[bytes]
    own_pose: Pose
    def __init__(self, agent_id: _Optional[int] = ..., session_id: _Optional[int] = ..., sequence: _Optional[int] = ..., capture_time_ns: _Optional[int] = ..., send_time_ns: _Optional[int] = ..., pose: _Optional[_Union[Pose, _Mapping]] = ..., calibration: _Optional[_Union[SensorCalibration, _Mapping]] = ..., grid: _Optional[_Union[BevGridSpec, _Mapping]] = ..., codec_id: _Optional[str] = ..., rate_level: _Optional[int] = ..., feature_dtype: _Optional[_Union[FeatureDtype, str]] = ..., tiles: _Optional[_Iterable[_Union[Tile, _Mapping]]] = ..., tile_count: _Optional[int] = ..., chunk_index: _Optional[int] = ..., chunk_count: _Optional[int] = ..., detections: _Optional[_Iterable[_Union[Box3D, _Mapping]]] = ..., auth_token: _Optional[str] = ..., odometry: _Optional[_Union[Pose, _Mapping]] = ..., pose_correction_sequence: _Optional[int] = ..., scan_blocks: _Optional[_Iterable[bytes]] = ..., own_pose: _Optional[_Union[Pose, _Mapping]] = ...) -> None: ...

class LinkReport(_message.Message):
    __slots__ = ("window_ms", "loss_fraction", "delivered_bitrate_bps", "rtt_ms", "frames_late", "last_sequence", "queueing_delay_ms")
    WINDOW_MS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FRACTION_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_BITRATE_BPS_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_LATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    QUEUEING_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    window_ms: float
    loss_fraction: float
    delivered_bitrate_bps: int
    rtt_ms: float
    frames_late: int
    last_sequence: int
    queueing_delay_ms: float
    def __init__(self, window_ms: _Optional[float] = ..., loss_fraction: _Optional[float] = ..., delivered_bitrate_bps: _Optional[int] = ..., rtt_ms: _Optional[float] = ..., frames_late: _Optional[int] = ..., last_sequence: _Optional[int] = ..., queueing_delay_ms: _Optional[float] = ...) -> None: ...

class Control(_message.Message):
    __slots__ = ("target_bitrate_bps", "target_rate_level", "target_frame_rate_hz", "pose_correction", "pose_correction_sequence", "link")
    TARGET_BITRATE_BPS_FIELD_NUMBER: _ClassVar[int]
    TARGET_RATE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_FRAME_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    POSE_CORRECTION_FIELD_NUMBER: _ClassVar[int]
    POSE_CORRECTION_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    target_bitrate_bps: int
    target_rate_level: int
    target_frame_rate_hz: float
    pose_correction: Pose
    pose_correction_sequence: int
    link: LinkReport
    def __init__(self, target_bitrate_bps: _Optional[int] = ..., target_rate_level: _Optional[int] = ..., target_frame_rate_hz: _Optional[float] = ..., pose_correction: _Optional[_Union[Pose, _Mapping]] = ..., pose_correction_sequence: _Optional[int] = ..., link: _Optional[_Union[LinkReport, _Mapping]] = ...) -> None: ...

class AgentContribution(_message.Message):
    __slots__ = ("agent_id", "status", "sequence", "age_ms", "tiles_fresh", "tiles_substituted", "tiles_dropped", "substituted_age_ms", "substituted_max_age_ms", "chunks_missing", "pose_corrected", "pose_correction_m", "pose_correction_deg", "matched_objects")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    AGE_MS_FIELD_NUMBER: _ClassVar[int]
    TILES_FRESH_FIELD_NUMBER: _ClassVar[int]
    TILES_SUBSTITUTED_FIELD_NUMBER: _ClassVar[int]
    TILES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    SUBSTITUTED_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    SUBSTITUTED_MAX_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_MISSING_FIELD_NUMBER: _ClassVar[int]
    POSE_CORRECTED_FIELD_NUMBER: _ClassVar[int]
    POSE_CORRECTION_M_FIELD_NUMBER: _ClassVar[int]
    POSE_CORRECTION_DEG_FIELD_NUMBER: _ClassVar[int]
    MATCHED_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    agent_id: int
    status: ContributionStatus
    sequence: int
    age_ms: float
    tiles_fresh: int
    tiles_substituted: int
    tiles_dropped: int
    substituted_age_ms: float
    substituted_max_age_ms: float
    chunks_missing: int
    pose_corrected: bool
    pose_correction_m: float
    pose_correction_deg: float
    matched_objects: int
    def __init__(self, agent_id: _Optional[int] = ..., status: _Optional[_Union[ContributionStatus, str]] = ..., sequence: _Optional[int] = ..., age_ms: _Optional[float] = ..., tiles_fresh: _Optional[int] = ..., tiles_substituted: _Optional[int] = ..., tiles_dropped: _Optional[int] = ..., substituted_age_ms: _Optional[float] = ..., substituted_max_age_ms: _Optional[float] = ..., chunks_missing: _Optional[int] = ..., pose_corrected: _Optional[bool] = ..., pose_correction_m: _Optional[float] = ..., pose_correction_deg: _Optional[float] = ..., matched_objects: _Optional[int] = ...) -> None: ...

class LinkStats(_message.Message):
    __slots__ = ("agent_id", "transport", "frames_received", "frames_refused", "frames_late", "chunks_received", "chunks_missing", "tiles_corrupt", "bytes_received", "loss_fraction", "delivered_bitrate_bps", "rtt_ms", "last_sequence", "last_receive_time_ns")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_REFUSED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_LATE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_MISSING_FIELD_NUMBER: _ClassVar[int]
    TILES_CORRUPT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    LOSS_FRACTION_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_BITRATE_BPS_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LAST_RECEIVE_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    agent_id: int
    transport: str
    frames_received: int
    frames_refused: int
    frames_late: int
    chunks_received: int
    chunks_missing: int
    tiles_corrupt: int
    bytes_received: int
    loss_fraction: float
    delivered_bitrate_bps: int
    rtt_ms: float
    last_sequence: int
    last_receive_time_ns: int
    def __init__(self, agent_id: _Optional[int] = ..., transport: _Optional[str] = ..., frames_received: _Optional[int] = ..., frames_refused: _Optional[int] = ..., frames_late: _Optional[int] = ..., chunks_received: _Optional[int] = ..., chunks_missing: _Optional[int] = ..., tiles_corrupt: _Optional[int] = ..., bytes_received: _Optional[int] = ..., loss_fraction: _Optional[float] = ..., delivered_bitrate_bps: _Optional[int] = ..., rtt_ms: _Optional[float] = ..., last_sequence: _Optional[int] = ..., last_receive_time_ns: _Optional[int] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "duration_ms")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    duration_ms: float
    def __init__(self, stage: _Optional[str] = ..., duration_ms: _Optional[float] = ...) -> None: ...

class FusedFrame(_message.Message):
    __slots__ = ("sequence", "fusion_time_ns", "ego_agent_id", "reference_pose", "reference_own_pose", "boxes", "contributions", "link_stats", "capture_time_ns", "publish_time_ns", "latency_ms", "stage_timings", "grid", "codec_id", "feature_dtype", "tiles", "agent_frames")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    FUSION_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    EGO_AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_POSE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_OWN_POSE_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    LINK_STATS_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    STAGE_TIMINGS_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    CODEC_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    AGENT_FRAMES_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    fusion_time_ns: int
    ego_agent_id: int
    reference_pose: Pose
    reference_own_pose: Pose
    boxes: _containers.RepeatedCompositeFieldContainer[Box3D]
    contributions: _containers.RepeatedCompositeFieldContainer[AgentContribution]
    link_stats: _containers.RepeatedCompositeFieldContainer[LinkStats]
    capture_time_ns: int
    publish_time_ns: int
    latency_ms: float
    stage_timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    grid: BevGridSpec
    codec_id: str
    feature_dtype: FeatureDtype
    tiles: _containers.RepeatedCompositeFieldContainer[Tile]
    agent_frames: _containers.RepeatedCompositeFieldContainer[FeatureFrame]
    def __init__(self, sequence: _Optional[int] = ..., fusion_time_ns: _Optional[int] = ..., ego_agent_id: _Optional[int] = ..., reference_pose: _Optional[_Union[Pose, _Mapping]] = ..., reference_own_pose: _Optional[_Union[Pose, _Mapping]] = ..., boxes: _Optional[_Iterable[_Union[Box3D, _Mapping]]] = ..., contributions: _Optional[_Iterable[_Union[AgentContribution, _Mapping]]] = ..., link_stats: _Optional[_Iterable[_Union[LinkStats, _Mapping]]] = ..., capture_time_ns: _Optional[int] = ..., publish_time_ns: _Optional[int] = ..., latency_ms: _Optional[float] = ..., stage_timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., grid: _Optional[_Union[BevGridSpec, _Mapping]] = ..., codec_id: _Optional[str] = ..., feature_dtype: _Optional[_Union[FeatureDtype, str]] = ..., tiles: _Optional[_Iterable[_Union[Tile, _Mapping]]] = ..., agent_frames: _Optional[_Iterable[_Union[FeatureFrame, _Mapping]]] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("include_features", "agent_ids", "min_score", "max_rate_hz", "include_agent_frames")
    INCLUDE_FEATURES_FIELD_NUMBER: _ClassVar[int]
    AGENT_IDS_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    MAX_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_AGENT_FRAMES_FIELD_NUMBER: _ClassVar[int]
    include_features: bool
    agent_ids: _containers.RepeatedScalarFieldContainer[int]
    min_score: float
    max_rate_hz: float
    include_agent_frames: bool
    def __init__(self, include_features: _Optional[bool] = ..., agent_ids: _Optional[_Iterable[int]] = ..., min_score: _Optional[float] = ..., max_rate_hz: _Optional[float] = ..., include_agent_frames: _Optional[bool] = ...) -> None: ...
