"""The feature codec: exact round trips, independent tiles, rate levels, refusals and framing."""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bev import BevGridConfig
from models.codec import (
    CodecConfig,
    CodecError,
    CodedFrame,
    CodedTile,
    FeatureCodec,
    ReceiveStats,
    receive,
    select_tiles,
)
from models.codec_train import (
    CodecOptimConfig,
    FeatureSample,
    load_codec,
    train_codec,
)
from models.detector import DetectorConfig, build_detector
from protos import FeatureFrame
from transport.framing import (
    GridSpec,
    boxes_from_proto,
    boxes_to_proto,
    feature_frame,
    pose_from_proto,
    pose_to_proto,
)

SMALL = CodecConfig(latent_channels=4, hidden_channels=8, tile_cells=2, rate_levels=3, alphabet_half=8)
CHANNELS = 8


def _codec(seed: int = 0) -> FeatureCodec:
    torch.manual_seed(seed)
    codec = FeatureCodec(SMALL, CHANNELS).eval()
    codec.update_tables()
    return codec


def _features(seed: int = 0, shape: tuple[int, int] = (12, 12)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sparse = torch.rand(1, 1, *shape, generator=g) < 0.3
    return torch.relu(torch.randn(1, CHANNELS, *shape, generator=g)) * 3 * sparse


@pytest.mark.parametrize("level", [0, 1, 2])
def test_bytes_decode_to_exactly_what_the_decoder_was_trained_on(level: int) -> None:
    codec, features = _codec(), _features()
    frame = codec.encode(features, level)
    assert frame.tiles and all(t.payload for t in frame.tiles)
    assert codec.encode(features, level) == frame  # deterministic bytes
    decoded, mask, report = codec.decode(frame)
    with torch.no_grad():
        trained_on, _ = codec(features, level)  # the straight-through path the decoder learns from
    assert torch.equal(decoded, trained_on)
    assert torch.all(mask == 1) and not report.refused and len(report.decoded) == len(frame.tiles)


def test_a_dropped_tile_leaves_every_other_tile_decodable() -> None:
    codec, features = _codec(), _features()
    frame = codec.encode(features, 1)
    full, _, _ = codec.decode(frame)
    lost = 4  # the middle tile of a 3 x 3 tile grid
    partial = CodedFrame(frame.level, frame.feature_shape, tuple(t for t in frame.tiles if t.index != lost))
    decoded, mask, report = codec.decode(partial)
    assert sorted(report.decoded) == [i for i in range(9) if i != lost]
    # Tile 4 covers latent cells 2..3 x 2..3, i.e. feature cells 4..7 x 4..7.
    inside = torch.zeros(12, 12, dtype=torch.bool)
    inside[4:8, 4:8] = True
    assert torch.all(mask[0, 0][inside] == 0) and torch.all(mask[0, 0][~inside] == 1)
    assert torch.equal(decoded[..., ~inside], full[..., ~inside])


def test_bad_tiles_are_refused_by_name_and_the_rest_decodes() -> None:
    codec, features = _codec(), _features()
    frame = codec.encode(features, 2)
    tiles = list(frame.tiles)
    flipped = bytearray(tiles[0].payload)
    flipped[0] ^= 0xFF
    tiles[0] = dataclasses.replace(tiles[0], payload=bytes(flipped))  # CRC no longer matches
    tiles[1] = dataclasses.replace(tiles[1], payload=tiles[1].payload[:-1])  # truncated in transit
    tiles.append(dataclasses.replace(tiles[2], index=99))  # no such tile
    tiles.append(tiles[3])  # sent twice
    _, mask, report = codec.decode(CodedFrame(frame.level, frame.feature_shape, tuple(tiles)))
    reasons = dict(report.refused)
    assert "CRC-32 mismatch" in reasons[0] and "CRC-32 mismatch" in reasons[1]
    assert "outside 0..8" in reasons[99] and "sent twice" in reasons[3]
    assert sorted(report.decoded) == list(range(2, 9))
    assert mask.sum() == 7 * 4 * 4


def test_receive_refuses_a_foreign_codec_and_counts_everything() -> None:
    codec, features = _codec(), _features()
    frame = codec.encode(features, 0)
    stats = ReceiveStats()
    assert receive(codec, "ib-someone-else", 0, frame.feature_shape, frame.tiles, stats) is None
    assert receive(codec, codec.codec_id, 7, frame.feature_shape, frame.tiles, stats) is None
    assert stats.frames_refused == 2 and "outside 0..2" in stats.last_error
    bad = (dataclasses.replace(frame.tiles[0], crc32=frame.tiles[0].crc32 ^ 1),) + frame.tiles[1:]
    result = receive(codec, codec.codec_id, 0, frame.feature_shape, bad, stats)
    assert result is not None
    assert (stats.frames_decoded, stats.tiles_decoded, stats.tiles_refused) == (1, 8, 1)
    assert _codec(seed=1).codec_id != codec.codec_id  # other weights, other id


def test_encode_rejects_features_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="expected features"):
        _codec().encode(torch.zeros(1, CHANNELS + 1, 12, 12), 0)
    with pytest.raises(ValueError, match="rate level 3 out of range"):
        _codec().encode(_features(), 3)
    with pytest.raises(CodecError, match="feature channels"):
        _codec().decode(CodedFrame(0, (CHANNELS + 1, 12, 12), ()))


def test_select_tiles_keeps_the_most_relevant_within_the_budget() -> None:
    tiles = tuple(CodedTile(i, bytes(8), zlib.crc32(bytes(8)), relevance=r) for i, r in enumerate([0.1, 0.9, 0.5]))
    frame = CodedFrame(0, (CHANNELS, 4, 4), tiles)
    assert [t.index for t in select_tiles(frame, 16).tiles] == [1, 2]
    assert [t.index for t in select_tiles(frame, 7).tiles] == []
    assert select_tiles(frame, None) is frame


def test_relevance_is_the_maximum_over_each_tile() -> None:
    codec, features = _codec(), _features()
    relevance = torch.zeros(12, 12)
    relevance[5, 9] = 0.7  # latent cell (2, 4): tile row 1, column 2 -> index 5
    frame = codec.encode(features, 0, relevance=relevance)
    assert [t.relevance for t in frame.tiles] == pytest.approx([0.7 if t.index == 5 else 0.0 for t in frame.tiles])


def test_training_trades_rate_for_detection_and_checkpoints_round_trip(tmp_path: Path) -> None:
    grid = BevGridConfig(x_min_m=-6, x_max_m=6, y_min_m=-6, y_max_m=6, cell_size_m=0.25)  # 12 x 12 features
    detector = build_detector(DetectorConfig(grid=grid, feature_channels=CHANNELS)).eval()
    codec = FeatureCodec(SMALL, CHANNELS)
    samples = [FeatureSample(_features(s).half(), torch.eye(4)[None], np.array([[1.0, 2.0, 0.8, 4.0, 1.8, 1.5, 0.3]]))
               for s in range(4)]
    config = CodecOptimConfig(steps=40, lr=5e-3, rate_weights=(200.0, 100.0, 50.0), checkpoint_every=1000)
    kilobytes: list[float] = []
    train_codec(detector, codec, samples, config, tmp_path / "codec.pt",
                on_step=lambda step, values: kilobytes.append(values["kilobytes"]))
    assert np.mean(kilobytes[-10:]) < np.mean(kilobytes[:10])
    loaded, extra = load_codec(tmp_path / "codec.pt", detector.config)
    assert extra["step"] == 40 and loaded.codec_id == codec.codec_id
    assert loaded.encode(samples[0].features.float(), 1) == codec.encode(samples[0].features.float(), 1)
    with pytest.raises(CodecError, match="feature_channels: detector has 16, codec was trained on 8"):
        load_codec(tmp_path / "codec.pt", detector.config.model_copy(update={"feature_channels": 16}))
    # A merge trained later on the same frozen detector changes nothing the codec codes.
    load_codec(tmp_path / "codec.pt", detector.config.model_copy(update={"merge": "context"}))


def test_rate_weights_must_fall_with_the_level() -> None:
    with pytest.raises(ValueError, match="must decrease"):
        CodecOptimConfig(rate_weights=(1.0, 2.0))


def test_framing_round_trips_pose_boxes_and_tiles() -> None:
    from models.geometry import se3_from_xyz_rpy

    pose = se3_from_xyz_rpy(10.0, -4.0, 1.5, 0.02, -0.03, 2.5)
    np.testing.assert_allclose(pose_from_proto(pose_to_proto(pose)), pose, atol=1e-12)
    boxes = np.array([[1, 2, 0.8, 4.2, 1.8, 1.5, 0.3, 0.9, 0], [5, -3, 0.9, 0.6, 0.6, 1.7, -1.2, 0.4, 1]])
    np.testing.assert_allclose(boxes_from_proto(boxes_to_proto(boxes)), boxes, atol=1e-6)
    codec, features = _codec(), _features()
    coded = codec.encode(features, 1)
    grid = GridSpec(-6, 6, -6, 6, 1.0, CHANNELS, SMALL.tile_cells * SMALL.latent_stride)
    wire = feature_frame(agent_id=3, sequence=7, capture_time_ns=1, world_from_agent=pose, grid=grid,
                         codec_id=codec.codec_id, rate_level=1, tiles=coded.tiles,
                         tile_count=codec.tile_count(coded.feature_shape), detections=boxes).SerializeToString()
    message = FeatureFrame.FromString(wire)
    assert (message.grid.height_cells, message.grid.width_cells, message.tile_count) == (12, 12, 9)
    tiles = tuple(CodedTile(t.index, t.payload, t.crc32, t.relevance) for t in message.tiles)
    stats = ReceiveStats()
    decoded = receive(codec, message.codec_id, message.rate_level, coded.feature_shape, tiles, stats)
    assert decoded is not None and torch.equal(decoded[0], codec.decode(coded)[0])


def test_encode_within_a_budget_picks_the_best_level_that_fits() -> None:
    codec, features = _codec(), _features()
    sizes = [codec.encode(features, level).payload_bytes for level in range(3)]
    estimates = codec.estimate_bytes(features)
    for size, estimate in zip(sizes, estimates):  # the entropy model predicts the coder's output closely
        assert abs(size - estimate) <= 0.1 * size + 4 * len(codec.encode(features, 0).tiles)
    generous = codec.encode_within(features, max_bytes=10**6)
    assert generous.level == 2 and generous.payload_bytes == sizes[2]
    tight = codec.encode_within(features, max_bytes=sizes[0] // 2)
    assert tight.level == 0 and tight.payload_bytes <= sizes[0] // 2 and tight.tiles


def test_committed_codec_levels_are_monotone_in_bytes_on_a_fresh_world() -> None:
    """The committed detector and codec, on a world never used in training (seed 7)."""
    from agents import SyntheticWorld, WorldConfig
    from launch.codec_cmd import load_codec_for
    from launch.eval_cmd import DEFAULT_CHECKPOINT
    from launch.samples import coop_sample
    from models.detector import load_checkpoint

    detector = load_checkpoint(DEFAULT_CHECKPOINT)[0].eval()
    codec = load_codec_for(detector)
    world = SyntheticWorld(WorldConfig(seed=7, frames=3, agents=2, camera={"count": 0}))
    sample = coop_sample(world.frame(2), detector.grid, detector.feature_cell_m)
    with torch.no_grad():
        features = detector.features([torch.from_numpy(p) for p in sample.points])
    for k in range(len(sample.points)):
        sizes = [codec.encode(features[k:k + 1], level).payload_bytes for level in range(codec.config.rate_levels)]
        assert sizes == sorted(sizes) and sizes[0] < sizes[-1], sizes
        decoded, mask, report = codec.decode(codec.encode(features[k:k + 1], 0))
        assert decoded.shape == features[k:k + 1].shape and not report.refused and torch.all(mask == 1)
