"""Chunks, the deadline buffer and frame substitution under deterministic loss (in memory, no network).

Real coded frames of a synthetic world are split into chunks as the WebRTC uplink sends them;
the test drops chunks by a fixed pattern and hands the rest to a fusion node's receive path,
then fuses slots and checks what each agent contributed.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from agents import AgentNode, AgentNodeConfig, FrameSource, SourceConfig, WorldConfig
from fusion import FusionConfig, FusionNode
from fusion.substitute import EvidenceMemory
from models.warp import warp_to_ego
from models.codec_train import load_codec
from models.detector import load_checkpoint
from protos import ContributionStatus, FeatureFrame, LinkReport
from transport import split_frame
from transport.deadline import AgentBuffer, ChunkRefused
from transport.rate import RateConfig, RateController

ROOT = Path(__file__).resolve().parent.parent
WORLD = WorldConfig(seed=5, agents=3, frames=5, camera={"count": 0})
PERIOD_NS = 100_000_000
STATUS = ContributionStatus


@pytest.fixture(scope="module")
def models():
    detector, _ = load_checkpoint(ROOT / "models/checkpoints/mobiledet_tiny.pt")
    codec, _ = load_codec(ROOT / "models/checkpoints/codec_mobiledet_tiny.pt", detector.config)
    return detector.eval(), codec.eval()


@pytest.fixture(scope="module")
def frames(models) -> dict[int, list[FeatureFrame]]:
    """Per agent, the coded frames of the world on a 10 Hz sensor clock."""
    detector, codec = models
    start = (time.time_ns() // PERIOD_NS) * PERIOD_NS
    out = {}
    for agent_id in (0, 1, -1):
        node = AgentNode(AgentNodeConfig(agent_id=agent_id, source=SourceConfig(world=WORLD)), detector, codec,
                         FrameSource(SourceConfig(world=WORLD), agent_id))
        out[agent_id] = [node.compute(k, start + k * PERIOD_NS) for k in range(WORLD.frames)]
        node._compute_thread.shutdown()
    return out


def test_chunks_fit_hold_whole_disjoint_tiles_and_the_surest_boxes(frames) -> None:
    for frame in frames[1]:
        chunks = split_frame(frame, 1100)
        assert len(chunks) > 1 and all(c.chunk_count == len(chunks) for c in chunks)
        assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
        assert max(c.ByteSize() for c in chunks) <= 1100
        indices = [t.index for c in chunks for t in c.tiles]
        assert sorted(indices) == sorted(t.index for t in frame.tiles)  # every tile once, whole
        for c in chunks:  # every chunk carries what is needed to place its tiles
            assert c.sequence == frame.sequence and c.capture_time_ns == frame.capture_time_ns
            assert c.pose == frame.pose and c.grid == frame.grid and c.tile_count == frame.tile_count
        sent = [b.score for b in chunks[0].detections]
        assert sent == sorted((b.score for b in frame.detections), reverse=True)[:len(sent)] and sent
        assert not any(c.detections for c in chunks[1:])


def _node(models, **config) -> FusionNode:
    detector, codec = models
    return FusionNode(FusionConfig(listen="127.0.0.1:0", allow_any_agent=True, rate_hz=10, **config), detector, codec)


async def _deliver(node: FusionNode, frames: dict[int, list[FeatureFrame]], lost: dict[tuple[int, int], set[int]]
                   ) -> None:
    """Every agent's frames as chunks, except chunk indices ``lost[(agent, frame)]`` (all: the whole frame)."""
    for k in range(WORLD.frames):
        for agent_id, agent_frames in frames.items():
            state = node._state(agent_id, "webrtc")
            for chunk in split_frame(agent_frames[k], 1100):
                if chunk.chunk_index in lost.get((agent_id, k), set()):
                    continue
                await node._receive(state, chunk, chunk.ByteSize(), agent_frames[k].capture_time_ns + 30_000_000)


def _contribution(fused, agent_id: int):
    return next(c for c in fused.contributions if c.agent_id == agent_id)


@pytest.mark.parametrize("substitute", [True, False])
async def test_lost_chunks_and_frames_are_substituted_from_earlier_tiles_or_left_out(models, frames,
                                                                                    substitute: bool) -> None:
    node = _node(models, substitute=substitute, max_age_ms=300)
    chunk_count = len(split_frame(frames[1][3], 1100))
    pattern = {(1, 3): {1, 2}, (-1, 4): set(range(64))}  # agent 1 loses two chunks of frame 3; agent -1 all of frame 4
    try:
        await _deliver(node, frames, pattern)
        slot = node.slot_of(frames[0][3].capture_time_ns)
        fused3, fused4 = node.fuse_slot(slot), node.fuse_slot(slot + 1)
    finally:
        node._torch_thread.shutdown()
    one = _contribution(fused3[0], 1)
    tile_count = frames[1][3].tile_count
    assert one.tiles_fresh + one.tiles_substituted + one.tiles_dropped == tile_count
    assert one.chunks_missing == 2 and one.tiles_fresh < tile_count
    assert _contribution(fused3[0], 0).status == STATUS.CONTRIBUTION_STATUS_FRESH
    assert _contribution(fused3[0], 0).tiles_fresh == tile_count
    rsu = _contribution(fused4[0], -1)
    if substitute:
        assert one.status == STATUS.CONTRIBUTION_STATUS_SUBSTITUTED and one.tiles_substituted > 0
        assert one.substituted_age_ms == pytest.approx(100.0, abs=1.0)  # the previous frame, 100 ms older
        assert rsu.status == STATUS.CONTRIBUTION_STATUS_SUBSTITUTED and rsu.tiles_fresh == 0
        assert rsu.tiles_substituted > 0 and rsu.substituted_max_age_ms == pytest.approx(100.0, abs=1.0)
    else:
        assert one.status == STATUS.CONTRIBUTION_STATUS_PARTIAL and one.tiles_substituted == 0
        assert one.tiles_dropped == tile_count - one.tiles_fresh
        assert rsu.status == STATUS.CONTRIBUTION_STATUS_MISSING


async def test_substitution_keeps_the_boxes_closer_to_the_loss_free_ones(models, frames) -> None:
    """Every remote agent loses every other chunk of every frame after the first: the fused boxes with
    substitution are closer to the loss-free fusion than without (counted as matched box centres)."""
    pattern = {(a, k): {1, 3, 5} for a in (1, -1) for k in range(1, WORLD.frames)}
    results = {}
    for name, config, lost in (("full", {"substitute": True}, {}), ("subst", {"substitute": True}, pattern),
                               ("none", {"substitute": False}, pattern)):
        node = _node(models, **config)
        try:
            await _deliver(node, frames, lost)
            first = node.slot_of(frames[0][0].capture_time_ns)
            results[name] = [node.fuse_slot(first + k)[0] for k in range(WORLD.frames)]
        finally:
            node._torch_thread.shutdown()

    def matched(a, b) -> int:
        pa = np.array([[x.x_m, x.y_m] for x in a.boxes if x.score > 0.3]).reshape(-1, 2)
        pb = np.array([[x.x_m, x.y_m] for x in b.boxes if x.score > 0.3]).reshape(-1, 2)
        if not len(pa) or not len(pb):
            return 0
        return int((np.linalg.norm(pa[:, None] - pb[None], axis=2).min(axis=1) < 1.0).sum())

    subst = sum(matched(f, s) for f, s in zip(results["full"], results["subst"]))
    none = sum(matched(f, s) for f, s in zip(results["full"], results["none"]))
    assert subst > none, (subst, none)


def test_memory_moves_old_evidence_by_the_ego_motion_and_weights_it_by_age(models) -> None:
    detector, codec = models
    grid, cell = detector.grid, detector.feature_cell_m
    h, w = round((grid.y_max_m - grid.y_min_m) / cell), round((grid.x_max_m - grid.x_min_m) / cell)
    memory = EvidenceMemory(grid, 10, time_origin_ns=0)
    first = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w).repeat(1, 2, 1, 1)
    pose_a = np.eye(4)
    memory.take(first, torch.ones(1, 1, h, w), pose_a, capture_time_ns=PERIOD_NS)
    pose_b = np.eye(4)
    pose_b[0, 3] = 2 * cell  # the agent moved two cells along x
    half = 20  # the first two rows of 10-cell tiles
    arrived = torch.zeros(1, 1, h, w)
    arrived[..., : half, :] = 1  # only the first 20 rows (two rows of tiles) arrived
    second = torch.full((1, 2, h, w), -5.0)
    memory.take(second, arrived, pose_b, capture_time_ns=2 * PERIOD_NS)
    ev = memory.evidence(2 * PERIOD_NS, max_age_ms=300, substitute=True, fresh_capture_ns=2 * PERIOD_NS,
                         tile_count=(h // 10) * (w // 10))
    assert np.allclose(ev.world_from_agent, pose_b)
    fresh = ev.features[0, 0, : half]
    assert torch.all(fresh == -5.0) and torch.all(ev.weight[0, 0, : half] == 1.0)
    old = ev.features[0, 0, half:, : w - 2]
    expected = first[0, 0, half:, 2:]  # cell c of the new frame is cell c + 2 of the old one
    assert torch.equal(old, expected)
    assert torch.allclose(ev.weight[0, 0, half:, : w - 2], torch.tensor(1 - 100 / 300))
    assert torch.all(ev.weight[0, 0, half:, w - 2:] == 0)  # never seen: no evidence
    assert ev.substituted_tiles == (h - half) // 10 * (w // 10) and ev.fresh_tiles == (half) // 10 * (w // 10)
    late = memory.evidence(4 * PERIOD_NS, max_age_ms=300, substitute=True, fresh_capture_ns=None, tile_count=25)
    assert torch.all(late.weight[0, 0, half:] == 0)  # 300 ms old: at the maximum age, no weight left
    assert torch.allclose(late.weight[0, 0, :half], torch.tensor(1 - 200 / 300))
    assert late.fresh_tiles == 0 and late.substituted_tiles == 10
    assert memory.evidence(5 * PERIOD_NS, 300, substitute=True, fresh_capture_ns=None, tile_count=25) is None
    assert memory.evidence(2 * PERIOD_NS, 300, substitute=False, fresh_capture_ns=None, tile_count=25) is None


def _chunk(frames, k: int = 1) -> FeatureFrame:
    chunks = split_frame(frames[1][k], 1100)
    out = FeatureFrame()
    out.CopyFrom(chunks[1])
    return out


def test_bad_chunks_are_refused_named_and_counted_and_lose_nothing_else(frames) -> None:
    buffer = AgentBuffer(1, keep=2, max_future_frames=100)
    good = split_frame(frames[1][1], 1100)
    buffer.add(good[0], 1, 100)
    bad = []
    corrupt = _chunk(frames)
    corrupt.tiles[0].payload = b"x" + corrupt.tiles[0].payload[1:]
    bad.append((corrupt, "bad checksum on tile"))
    out_of_range = _chunk(frames)
    out_of_range.tiles[0].index = out_of_range.tile_count + 3
    bad.append((out_of_range, "out of range"))
    twice = _chunk(frames)
    twice.tiles.append(twice.tiles[0])
    bad.append((twice, "duplicate tile index"))
    chunk_index = _chunk(frames)
    chunk_index.chunk_index = chunk_index.chunk_count
    bad.append((chunk_index, "chunk index"))
    duplicate = FeatureFrame()
    duplicate.CopyFrom(good[0])
    bad.append((duplicate, "duplicate chunk 0"))
    future = _chunk(frames)
    future.sequence += 1000
    bad.append((future, "from the far future"))
    contradicts = _chunk(frames)
    contradicts.capture_time_ns += 1
    bad.append((contradicts, "contradicts"))
    for chunk, reason in bad:
        with pytest.raises(ChunkRefused, match=reason):
            buffer.add(chunk, 2, 100)
    assert buffer.chunks_refused == len(bad) and buffer.chunks_received == 1
    for chunk in good[1:]:  # the rest of the frame still arrives whole
        buffer.add(chunk, 3, 100)
    assert buffer.frames[frames[1][1].sequence].complete
    for k in (2, 3, 4):
        buffer.add(split_frame(frames[1][k], 1100)[0], 4, 100)
    past = FeatureFrame()
    past.CopyFrom(split_frame(frames[1][0], 1100)[0])
    past.sequence = frames[1][1].sequence  # kept no longer: frames 3 and 4 are the newest two
    with pytest.raises(ChunkRefused, match="from the past"):
        buffer.add(past, 5, 100)
    assert buffer.chunks_refused == len(bad) + 1


async def test_the_node_counts_refused_chunks_by_reason_and_fuses_the_rest(models, frames) -> None:
    node = _node(models)
    try:
        state = node._state(1, "webrtc")
        chunks = split_frame(frames[1][0], 1100)
        corrupt = FeatureFrame()
        corrupt.CopyFrom(chunks[1])
        corrupt.tiles[0].crc32 ^= 1
        for chunk in (chunks[0], corrupt, *chunks[1:]):
            await node._receive(state, chunk, chunk.ByteSize(), time.time_ns())
        assert state.frames_refused == 1 and state.refused_by_reason == {"bad checksum on tile": 1}
        fused, _ = node.fuse_slot(node.slot_of(frames[1][0].capture_time_ns))
        assert _contribution(fused, 1).status == STATUS.CONTRIBUTION_STATUS_FRESH
    finally:
        node._torch_thread.shutdown()


def test_rate_control_ignores_random_loss_backs_off_on_queueing_and_lowers_the_frame_rate() -> None:
    control = RateController(RateConfig(enabled=True, start_bitrate_bps=400_000, min_frame_bytes=1200), 10.0)
    for _ in range(5):  # 30 % random loss, no queue: the rate does not fall
        control.update(LinkReport(loss_fraction=0.3, delivered_bitrate_bps=280_000, queueing_delay_ms=1.0))
    assert control.target_bps > 400_000 and control.congested_reports == 0
    control.update(LinkReport(loss_fraction=0.05, delivered_bitrate_bps=60_000, queueing_delay_ms=250.0))
    assert control.target_bps <= 0.8 * 60_000 + 1 and control.congested_reports == 1
    assert control.frame_rate_hz == pytest.approx(0.8 * 60_000 / 8 / 1200, rel=1e-3)  # below 10 Hz
    assert control.frame_budget_bytes >= 1199
    for _ in range(40):  # the queue drains: it probes back up to the sensor rate
        control.update(LinkReport(delivered_bitrate_bps=50_000, queueing_delay_ms=2.0))
    assert control.frame_rate_hz == 10.0


def test_link_report_counts_lost_chunks_and_whole_frames() -> None:
    buffer = AgentBuffer(1, chunk_grace_ms=20.0, window_ms=1000.0)
    now = 1_000_000_000_000
    for seq in range(10):
        if seq == 4:
            continue  # a whole frame lost (4 chunks)
        for index in range(4):
            if seq % 3 == 0 and index == 2:
                continue  # one chunk lost
            frame = FeatureFrame(agent_id=1, session_id=7, sequence=seq, capture_time_ns=now + seq, chunk_count=4,
                                 chunk_index=index, send_time_ns=now + seq * 100_000_000)
            buffer.add(frame, now + seq * 100_000_000 + 5_000_000, 1000)
    report = buffer.report(now + 950_000_000)
    # expected 40 chunks over sequences 0..9, received 36 - 4 (seq 0, 3, 6, 9 lose one) = 32
    assert report.loss_fraction == pytest.approx(1 - 32 / 40, abs=1e-6)
    assert report.delivered_bitrate_bps == 32 * 1000 * 8
    assert report.queueing_delay_ms == pytest.approx(0.0)



def test_the_deadline_buffer_learns_when_a_frame_is_complete_or_lost() -> None:
    """After 20 frames the buffer knows the link: an incomplete frame settles once the link's complete
    frames would all have been complete, and a frame of which nothing came is given up at the usual
    first-chunk delay (p95) + the grace period, not at the slot's deadline."""
    buffer = AgentBuffer(1, chunk_grace_ms=20.0)
    ms = 1_000_000
    base = 10**15
    for seq in range(30):  # chunks 1 ms apart, the first 40-49 ms after capture
        capture = base + seq * 100 * ms
        for index in range(4):
            frame = FeatureFrame(agent_id=1, sequence=seq, capture_time_ns=capture, chunk_count=4, chunk_index=index)
            buffer.add(frame, capture + (40 + seq % 10 + index) * ms, 1000)
    assert buffer.give_up_time_ns(base + 30 * 100 * ms, 20.0) == base + 30 * 100 * ms + (49 + 20) * ms
    capture = base + 30 * 100 * ms
    partial = buffer.add(FeatureFrame(agent_id=1, sequence=30, capture_time_ns=capture, chunk_count=4,
                                      chunk_index=0), capture + 45 * ms, 1000)
    assert buffer.settle_time_ns(partial) == capture + (45 + 3 + 3) * ms  # spread 3 ms (p95) + 3 ms
    assert not buffer.settled(partial, capture + 50 * ms) and buffer.settled(partial, capture + 51 * ms)
    fresh = AgentBuffer(1, chunk_grace_ms=20.0)  # nothing learnt yet: the grace period alone
    first = fresh.add(FeatureFrame(agent_id=1, sequence=0, capture_time_ns=base, chunk_count=4), base + 5 * ms, 10)
    assert fresh.settle_time_ns(first) == base + 25 * ms and fresh.give_up_time_ns(base, 20.0) is None


def test_the_whole_cell_shift_equals_resampling_the_grid(models) -> None:
    detector, _ = models
    memory = EvidenceMemory(detector.grid, 10, time_origin_ns=0)
    features = torch.randn(1, 3, 50, 50)
    memory.take(features, torch.ones(1, 1, 50, 50), np.eye(4), capture_time_ns=1)  # sets the cell size
    for dx, dy in ((3, -2), (-7, 5), (0, 11), (60, 0)):
        move = np.eye(4)
        move[0, 3], move[1, 3] = dx * memory.cell_m, dy * memory.cell_m
        assert memory._whole_cell_shift(move) == (dx, dy)
        shifted = memory._moved(move, features, 0.0)
        warped, inside = warp_to_ego(features, torch.as_tensor(move, dtype=torch.float32)[None], detector.grid,
                                     mode="nearest")
        assert torch.allclose(shifted, torch.where(inside > 0, warped, torch.zeros_like(warped)), atol=1e-6)
    turned = np.eye(4)
    turned[:2, :2] = [[0.0, -1.0], [1.0, 0.0]]
    assert memory._whole_cell_shift(turned) is None  # anything else is resampled
