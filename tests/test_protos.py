"""The wire contract: generated code is current, messages round-trip, gRPC works."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

import protos
from protos import generate

_GENERATED = ("cpstream_pb2.py", "cpstream_pb2.pyi", "cpstream_pb2_grpc.py")


def _assert_every_field_set(message: Message, path: str = "") -> None:
    """Fail if any field (recursively) is unset, so the builders below cover new fields."""
    for field in message.DESCRIPTOR.fields:
        name = f"{path}{field.name}"
        value = getattr(message, field.name)
        if field.is_repeated:
            assert len(value) > 0, f"{name} is empty"
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                for i, item in enumerate(value):
                    _assert_every_field_set(item, f"{name}[{i}].")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            assert message.HasField(field.name), f"{name} is unset"
            _assert_every_field_set(value, f"{name}.")
        else:
            assert value != field.default_value, f"{name} has its default value"


def _pose(x_m: float) -> protos.Pose:
    return protos.Pose(
        x_m=x_m,
        y_m=-2.5,
        z_m=1.75,
        roll_rad=0.01,
        pitch_rad=-0.02,
        yaw_rad=1.2,
        covariance=[0.1 if i % 7 == 0 else 0.001 for i in range(36)],
    )


def _transform(tx_m: float) -> protos.Transform4x4:
    return protos.Transform4x4(row_major=[1, 0, 0, tx_m, 0, 1, 0, 0.2, 0, 0, 1, 1.9, 0, 0, 0, 1])


def _grid() -> protos.BevGridSpec:
    return protos.BevGridSpec(
        x_min_m=-51.2,
        x_max_m=51.2,
        y_min_m=-51.2,
        y_max_m=51.2,
        cell_size_m=0.4,
        channels=64,
        height_cells=256,
        width_cells=256,
        tile_size_cells=32,
    )


def _tiles(count: int) -> list[protos.Tile]:
    tiles = []
    for index in range(5, 5 + count):  # nonzero, so every field counts as set
        payload = bytes([index]) * (10 + index)
        crc32 = zlib.crc32(payload)
        tiles.append(protos.Tile(index=index, payload=payload, crc32=crc32, relevance=0.5 + index))
    return tiles


def _boxes() -> list[protos.Box3D]:
    return [
        protos.Box3D(
            x_m=12.5,
            y_m=-3.0,
            z_m=0.8,
            length_m=4.5,
            width_m=1.9,
            height_m=1.6,
            yaw_rad=0.3,
            label=protos.ObjectClass.OBJECT_CLASS_VEHICLE,
            score=0.9,
        ),
        protos.Box3D(
            x_m=5.0,
            y_m=2.0,
            z_m=0.9,
            length_m=0.6,
            width_m=0.6,
            height_m=1.8,
            yaw_rad=-1.0,
            label=protos.ObjectClass.OBJECT_CLASS_PEDESTRIAN,
            score=0.6,
        ),
    ]


def full_feature_frame() -> protos.FeatureFrame:
    calibration = protos.SensorCalibration(
        lidar=protos.LidarCalibration(agent_from_lidar=_transform(0.0), beams=64, range_m=120.0),
        cameras=[
            protos.CameraCalibration(
                name=f"camera{k}",
                width_px=800,
                height_px=600,
                intrinsic=[400.0, 0, 400.0, 0, 400.0, 300.0, 0, 0, 1],
                agent_from_camera=_transform(0.5 + k),
            )
            for k in range(2)
        ],
    )
    return protos.FeatureFrame(
        agent_id=-3,
        session_id=0xDEADBEEFCAFEF00D,
        sequence=2**40 + 7,
        capture_time_ns=1_700_000_000_123_456_789,
        send_time_ns=1_700_000_000_143_456_789,
        pose=_pose(100.0),
        calibration=calibration,
        grid=_grid(),
        codec_id="ib-pillars-tiny",
        rate_level=2,
        feature_dtype=protos.FeatureDtype.FEATURE_DTYPE_FLOAT16,
        tiles=_tiles(3),
        tile_count=64,
        chunk_index=1,
        chunk_count=4,
        detections=_boxes(),
        auth_token="secret-token",
        odometry=_pose(3.0),
        pose_correction_sequence=1099511627700,
        scan_blocks=[b"RS\x01block"],
        own_pose=_pose(4.0),
    )


def full_fused_frame(sequence: int = 1) -> protos.FusedFrame:
    Status = protos.ContributionStatus
    return protos.FusedFrame(
        sequence=sequence,
        fusion_time_ns=1_700_000_000_200_000_000,
        ego_agent_id=1,
        reference_pose=_pose(-7.0),
        reference_own_pose=_pose(-8.0),
        boxes=_boxes(),
        contributions=[
            protos.AgentContribution(
                agent_id=1,
                status=Status.CONTRIBUTION_STATUS_FRESH,
                sequence=10,
                age_ms=35.0,
                tiles_fresh=60,
                tiles_substituted=3,
                tiles_dropped=1,
                substituted_age_ms=100.0,
                substituted_max_age_ms=200.0,
                chunks_missing=2,
                pose_corrected=True,
                pose_correction_m=0.4,
                pose_correction_deg=0.3,
                matched_objects=5,
            ),
            protos.AgentContribution(
                agent_id=-3,
                status=Status.CONTRIBUTION_STATUS_SUBSTITUTED,
                sequence=8,
                age_ms=230.0,
                tiles_fresh=20,
                tiles_substituted=40,
                tiles_dropped=4,
                substituted_age_ms=50.0,
                substituted_max_age_ms=50.0,
                chunks_missing=1,
                pose_corrected=True,
                pose_correction_m=0.1,
                pose_correction_deg=0.05,
                matched_objects=3,
            ),
        ],
        link_stats=[
            protos.LinkStats(
                agent_id=-3,
                transport="webrtc",
                frames_received=100,
                frames_refused=2,
                frames_late=5,
                chunks_received=390,
                chunks_missing=10,
                tiles_corrupt=1,
                bytes_received=1_234_567,
                loss_fraction=0.025,
                delivered_bitrate_bps=3_500_000,
                rtt_ms=12.5,
                last_sequence=8,
                last_receive_time_ns=1_700_000_000_190_000_000,
            )
        ],
        capture_time_ns=1_700_000_000_150_000_000,
        publish_time_ns=1_700_000_000_230_000_000,
        latency_ms=80.0,
        stage_timings=[
            protos.StageTiming(stage="decode", duration_ms=4.0),
            protos.StageTiming(stage="merge", duration_ms=2.5),
        ],
        grid=_grid(),
        codec_id="raw",
        feature_dtype=protos.FeatureDtype.FEATURE_DTYPE_FLOAT32,
        tiles=_tiles(2),
        agent_frames=[full_feature_frame()],
    )


def test_committed_code_matches_regeneration(tmp_path: Path) -> None:
    assert generate.main(["--out", str(tmp_path)]) == 0
    committed_dir = protos.PROTO_PATH.parent
    for name in _GENERATED:
        fresh = (tmp_path / "protos" / name).read_bytes()
        assert fresh == (committed_dir / name).read_bytes(), (
            f"protos/{name} is stale: run `python -m protos.generate` and commit the result"
        )


def test_feature_frame_round_trips_with_every_field_set() -> None:
    frame = full_feature_frame()
    _assert_every_field_set(frame)
    decoded = protos.FeatureFrame.FromString(frame.SerializeToString())
    assert decoded == frame
    assert decoded.tiles[2].crc32 == zlib.crc32(decoded.tiles[2].payload)


def test_fused_frame_round_trips_with_every_field_set() -> None:
    fused = full_fused_frame()
    _assert_every_field_set(fused)
    assert protos.FusedFrame.FromString(fused.SerializeToString()) == fused


def test_control_fields_have_presence() -> None:
    control = protos.Control(target_rate_level=0)
    decoded = protos.Control.FromString(control.SerializeToString())
    assert decoded.HasField("target_rate_level")  # level 0 is a real instruction
    assert not decoded.HasField("target_bitrate_bps")
    assert not decoded.HasField("pose_correction")


@pytest.mark.parametrize(
    "garbage",
    [b"\x08\xff\xff", b"\x12\x10abc", b"\x0f", b"\x00", b"\xff" * 12],
    ids=["truncated-varint", "truncated-bytes", "bad-wire-type", "field-zero", "overlong-varint"],
)
@pytest.mark.parametrize("message_type", [protos.FeatureFrame, protos.FusedFrame, protos.Control])
def test_garbage_raises_decode_error(garbage: bytes, message_type: type[Message]) -> None:
    with pytest.raises(DecodeError):
        message_type.FromString(garbage)


class _EchoFusion(protos.FusionServicer):
    """Answers every frame with a Control; gives each subscriber two fused frames."""

    async def Stream(
        self,
        request_iterator: AsyncIterator[protos.FeatureFrame],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[protos.Control]:
        async for frame in request_iterator:
            yield protos.Control(
                target_rate_level=frame.rate_level + 1,
                link=protos.LinkReport(last_sequence=frame.sequence),
            )

    async def Subscribe(
        self, request: protos.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[protos.FusedFrame]:
        for sequence in (1, 2):
            yield full_fused_frame(sequence)


@pytest.fixture
async def fusion_stub() -> AsyncIterator[protos.FusionStub]:
    server = grpc.aio.server()
    protos.add_FusionServicer_to_server(_EchoFusion(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield protos.FusionStub(channel)
    finally:
        await server.stop(grace=None)


async def test_grpc_stream_echoes_control_per_frame(fusion_stub: protos.FusionStub) -> None:
    frames = []
    for sequence in range(3):
        frame = full_feature_frame()
        frame.sequence = sequence
        frames.append(frame)

    controls = [control async for control in fusion_stub.Stream(iter(frames), timeout=5)]

    assert [c.link.last_sequence for c in controls] == [0, 1, 2]
    assert all(c.target_rate_level == frames[0].rate_level + 1 for c in controls)


async def test_grpc_subscribe_receives_fused_frames(fusion_stub: protos.FusionStub) -> None:
    request = protos.SubscribeRequest(
        include_features=True, agent_ids=[1, -3], min_score=0.1, max_rate_hz=10, include_agent_frames=True
    )

    received = [fused async for fused in fusion_stub.Subscribe(request, timeout=5)]

    assert received == [full_fused_frame(1), full_fused_frame(2)]
