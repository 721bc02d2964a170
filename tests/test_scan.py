"""Registration scans: thinning, packing into self-contained blocks, matching one onto another, chunking."""

from __future__ import annotations

import numpy as np
import pytest

from fusion.alignment import CorrectionConfig, correction_matrix, planar_delta, register_scans, scan_cloud
from models.geometry import invert_se3, se3_from_xyz_rpy, transform_points
from models.scan import MAX_BLOCKS, ScanConfig, ScanError, pack_scan, thin_scan, unpack_scan
from protos import FeatureFrame
from transport.deadline import AgentBuffer
from transport.framing import split_frame

CONFIG = ScanConfig(enabled=True, voxel_m=1.0, block_points=100)


def _wall(start: tuple[float, float], end: tuple[float, float], height: float, step: float = 0.25) -> np.ndarray:
    """Points on a vertical wall from ``start`` to ``end`` (x, y) up to ``height``."""
    length = float(np.hypot(end[0] - start[0], end[1] - start[1]))
    s = np.arange(0.0, length, step) / length
    z = np.arange(0.4, height, step)
    s, z = np.meshgrid(s, z)
    x = start[0] + s * (end[0] - start[0])
    y = start[1] + s * (end[1] - start[1])
    return np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)


def _block(x0: float, y0: float, x1: float, y1: float, height: float) -> np.ndarray:
    return np.concatenate([_wall((x0, y0), (x1, y0), height), _wall((x1, y0), (x1, y1), height),
                           _wall((x1, y1), (x0, y1), height), _wall((x0, y1), (x0, y0), height)])


def _town() -> np.ndarray:
    """A crossing: four buildings of different sizes around it and two parked vans (world frame)."""
    return np.concatenate([_block(8, 8, 30, 22, 9), _block(-35, 9, -9, 40, 12), _block(-28, -30, -8, -9, 7),
                           _block(9, -26, 21, -8, 15), _block(3, -5, 8, -3, 2.5), _block(-6, 4, -2, 6, 2.2)])


def test_thinning_keeps_one_point_per_voxel_in_the_height_band_and_range() -> None:
    points = np.array([[0.1, 0.1, 0.1], [0.2, 0.2, 1.0], [0.3, 0.3, 1.2], [5.2, 0.1, 2.0], [80.0, 0.0, 2.0],
                       [1.0, 1.0, 30.0]])
    thinned = thin_scan(points, CONFIG)  # the ground point, the far point and the high point are left out
    assert thinned.shape == (2, 3)
    assert {tuple(np.floor(p / CONFIG.voxel_m).astype(int)) for p in thinned} == {(0, 0, 1), (5, 0, 2)}
    assert thin_scan(np.zeros((0, 4)), CONFIG).shape == (0, 3)


def test_blocks_round_trip_within_the_quantisation_and_each_decodes_alone() -> None:
    points = thin_scan(_town(), CONFIG)
    blocks = pack_scan(points, CONFIG)
    assert len(blocks) == -(-len(points) // CONFIG.block_points)
    back = unpack_scan(blocks)
    assert back.shape == points.shape

    def rows(a: np.ndarray) -> np.ndarray:
        return a[np.lexsort(a.T[::-1])]

    error = np.abs(rows(back.astype(np.float64)) - rows(np.round(points / [0.02, 0.02, 0.1]) * [0.02, 0.02, 0.1]))
    assert error.max() < 1e-4
    assert (np.abs(rows(back) - rows(points)).max(axis=0) <= [0.0101, 0.0101, 0.0501]).all()  # half a step
    without = unpack_scan(blocks[:1] + blocks[2:])  # a lost block loses its points only
    assert len(without) == len(points) - len(unpack_scan(blocks[1:2]))


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:10], "shorter than its header"),
    (lambda b: b"XX" + b[2:], "not a version-1"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 0xFF]), "fails its CRC-32"),
])
def test_a_damaged_block_is_refused_by_name(damage, message) -> None:
    blocks = pack_scan(thin_scan(_town(), CONFIG), CONFIG)
    blocks[2] = damage(blocks[2])
    with pytest.raises(ScanError, match=f"block 2 .*{message}|block 2 {message}"):
        unpack_scan(blocks)


def test_too_many_blocks_are_refused() -> None:
    block = pack_scan(np.array([[1.0, 2.0, 3.0]]), CONFIG)[0]
    with pytest.raises(ScanError, match=f"more than {MAX_BLOCKS}"):
        unpack_scan([block] * (MAX_BLOCKS + 1))


def _scans(world_from_agent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The town as the reference (at the world origin) and as an agent at ``world_from_agent`` see it."""
    town = _town()
    reference = thin_scan(town, ScanConfig(voxel_m=1.0))
    agent = thin_scan(transform_points(invert_se3(world_from_agent), town), ScanConfig(voxel_m=1.0))
    return reference, agent


def test_a_scan_match_recovers_the_relative_pose_to_centimetres() -> None:
    truth = se3_from_xyz_rpy(6.0, -3.0, 0.0, 0.0, 0.0, np.deg2rad(35.0))  # ref_from_agent
    reference, agent = _scans(truth)
    believed = correction_matrix(np.array([0.6, -0.5, np.deg2rad(0.7)]), truth[:2, 3]) @ truth
    fit = register_scans(scan_cloud(reference), agent, believed, CorrectionConfig())
    assert fit is not None and fit.matches >= 150
    corrected = correction_matrix(fit.delta, believed[:2, 3]) @ believed
    error = planar_delta(invert_se3(truth) @ corrected)
    assert np.hypot(*error[:2]) < 0.03 and np.rad2deg(abs(error[2])) < 0.05, error
    assert np.sqrt(np.linalg.eigvalsh(fit.covariance[:2, :2]).max()) < 0.1  # and it knows it


def test_a_street_between_two_straight_walls_fixes_the_agent_across_not_along() -> None:
    street = np.concatenate([_wall((-60, 6), (60, 6), 8), _wall((-60, -6), (60, -6), 8)])
    truth = se3_from_xyz_rpy(4.0, 0.5, 0.0, 0.0, 0.0, 0.0)
    reference = thin_scan(street, ScanConfig(voxel_m=1.0))
    agent = thin_scan(transform_points(invert_se3(truth), street), ScanConfig(voxel_m=1.0))
    believed = correction_matrix(np.array([0.8, 0.4, 0.0]), truth[:2, 3]) @ truth
    fit = register_scans(scan_cloud(reference), agent, believed, CorrectionConfig())
    assert fit is not None
    corrected = correction_matrix(fit.delta, believed[:2, 3]) @ believed
    assert abs(corrected[1, 3] - truth[1, 3]) < 0.03  # across the street: found
    sigma_along, sigma_across = np.sqrt(fit.covariance[0, 0]), np.sqrt(fit.covariance[1, 1])
    assert sigma_along > 10 * sigma_across, (sigma_along, sigma_across)  # along it: not claimed


def test_too_little_overlap_gives_no_fit() -> None:
    reference = thin_scan(_block(8, 8, 30, 22, 9), ScanConfig(voxel_m=1.0))
    agent = thin_scan(_block(-300, -300, -290, -290, 9), ScanConfig(voxel_m=1.0))
    assert register_scans(scan_cloud(reference), agent, np.eye(4), CorrectionConfig()) is None


def test_scan_blocks_are_chunked_like_tiles_and_a_lost_chunk_loses_only_its_blocks() -> None:
    blocks = pack_scan(thin_scan(_town(), CONFIG), CONFIG)
    frame = FeatureFrame(agent_id=3, sequence=7, capture_time_ns=1, tile_count=0, scan_blocks=blocks)
    chunks = split_frame(frame, max_chunk_bytes=1100)
    assert len(chunks) > 1 and all(c.ByteSize() <= 1100 for c in chunks)
    assert [b for c in chunks for b in c.scan_blocks] == blocks
    buffer = AgentBuffer(agent_id=3)
    for chunk in chunks:
        assembly = buffer.add(chunk, 10, chunk.ByteSize())
    assert list(assembly.message().scan_blocks) == blocks
    partial = AgentBuffer(agent_id=3)
    for chunk in chunks[:1] + chunks[2:]:
        assembly = partial.add(chunk, 10, chunk.ByteSize())
    kept = list(assembly.message().scan_blocks)
    assert kept == [b for c in chunks[:1] + chunks[2:] for b in c.scan_blocks]
    assert len(unpack_scan(kept)) == len(unpack_scan(blocks)) - len(unpack_scan(list(chunks[1].scan_blocks)))


def test_under_rate_control_a_scan_keeps_the_whole_blocks_that_fit() -> None:
    from agents.node import _within

    blocks = [b"a" * 300, b"b" * 300, b"c" * 300]
    assert _within(blocks, 650) == blocks[:2]
    assert _within(blocks, 299) == [] and _within(blocks, 900) == blocks


def test_agents_take_turns_with_their_scans() -> None:
    from models.scan import scan_due

    config = ScanConfig(enabled=True, every_frames=3)
    due = {a: [k for k in range(9) if scan_due(config, a, k)] for a in (0, 1, -1, 2)}
    assert due == {0: [0, 3, 6], 1: [1, 4, 7], -1: [2, 5, 8], 2: [2, 5, 8]}
    assert not any(scan_due(ScanConfig(every_frames=1), 0, k) for k in range(3))  # off unless enabled


def test_an_uncertain_tracked_agent_sends_a_scan_with_every_frame() -> None:
    from models.scan import scan_due

    config = ScanConfig(enabled=True, every_frames=3, uncertain_sigma_m=0.15)
    assert [k for k in range(6) if scan_due(config, 1, k, sigma_xy_m=0.05)] == [1, 4]  # certain: its turns only
    assert [k for k in range(6) if scan_due(config, 1, k, sigma_xy_m=0.4)] == list(range(6))
    assert [k for k in range(6) if scan_due(config.model_copy(update={"uncertain_sigma_m": 0.0}), 1, k, 0.4)] == [1, 4]
    assert not scan_due(config.model_copy(update={"enabled": False}), 1, 1, 0.4)
