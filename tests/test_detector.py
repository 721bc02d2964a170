"""Tests for models.detector, models.cooperative and models.train: a registry sweep on a small grid,
empty inputs, fusion modes, checkpoints, a short training run and the augmentations."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from models.backbones import list_backbones
from models.bev import BevGrid, BevGridConfig
from models.cooperative import FUSION_MODES, CoopSample, detect_sample
from models.detector import (BevDetector, CheckpointError, DetectorConfig, build_detector, load_checkpoint,
                             save_checkpoint)
from models.geometry import invert_se3, se3_from_xyz_rpy, transform_boxes, transform_points, wrap_angle_rad
from models.pillars import PillarEncoder
from models.train import OptimConfig, init_from_checkpoint, jitter_frames, mirror, rotate_scene, sample_loss, train

GRID_CONFIG = BevGridConfig(x_min_m=-16.0, x_max_m=16.0, y_min_m=-16.0, y_max_m=16.0, cell_size_m=0.5)  # 64 x 64
SMALL_GRID_CONFIG = BevGridConfig(x_min_m=-8.0, x_max_m=8.0, y_min_m=-8.0, y_max_m=8.0, cell_size_m=0.5)  # 32 x 32

# (x, y, z, l, w, h, yaw_rad) in the ego ground frame, both inside the small grid.
GT_BOXES = np.array([[3.2, 2.4, 0.8, 4.0, 1.8, 1.5, 0.3],
                     [-4.1, -3.3, 0.8, 4.4, 2.0, 1.6, -2.0]])
EGO_FROM_AGENT1 = se3_from_xyz_rpy(2.0, -1.5, 0.0, 0.0, 0.0, 0.6)




def _config(backbone: str = "mobiledet_tiny", grid: BevGridConfig = GRID_CONFIG, **overrides) -> DetectorConfig:
    return DetectorConfig(backbone=backbone, grid=grid, pillar_channels=8, feature_channels=16, head_channels=16,
                          **overrides)


def _detector(backbone: str = "mobiledet_tiny", grid: BevGridConfig = GRID_CONFIG, seed: int = 0,
              **overrides) -> BevDetector:
    torch.manual_seed(seed)
    return build_detector(_config(backbone, grid, **overrides))


def _random_clouds(grid: BevGrid, sizes: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    """Clouds ``[N, 4]`` uniformly inside the grid, z in [0, 2], intensity in [0, 1]."""
    rng = np.random.default_rng(seed)
    clouds = []
    for n in sizes:
        xyz = rng.uniform([grid.x_min_m, grid.y_min_m, 0.0], [grid.x_max_m, grid.y_max_m, 2.0], size=(n, 3))
        clouds.append(torch.from_numpy(np.concatenate([xyz, rng.uniform(size=(n, 1))], axis=1).astype(np.float32)))
    return clouds


def _box_surface_points(boxes: np.ndarray, rng: np.random.Generator, per_box: int = 150) -> np.ndarray:
    """``[M * per_box, 4]`` points on the sides and top of each box (x, y, z, intensity)."""
    clouds = []
    for x, y, z, length, width, height, yaw in boxes:
        u = rng.uniform(-0.5, 0.5, size=(per_box, 3)) * [length, width, height]  # box frame
        side = rng.integers(0, 3, size=per_box)
        u[side == 0, 0] = np.sign(u[side == 0, 0]) * length / 2
        u[side == 1, 1] = np.sign(u[side == 1, 1]) * width / 2
        u[side == 2, 2] = height / 2
        c, s = math.cos(yaw), math.sin(yaw)
        xyz = np.stack([x + c * u[:, 0] - s * u[:, 1], y + s * u[:, 0] + c * u[:, 1], z + u[:, 2]], axis=1)
        clouds.append(np.concatenate([xyz, rng.uniform(0.2, 1.0, size=(per_box, 1))], axis=1))
    return np.concatenate(clouds)


def _coop_sample(seed: int = 0) -> CoopSample:
    """Two agents that both see the two GT boxes, plus a little ground clutter each."""
    rng = np.random.default_rng(seed)
    ego_from_agent = np.stack([np.eye(4), EGO_FROM_AGENT1])
    points, agent_gt = [], []
    for ego_from_this in ego_from_agent:
        this_from_ego = invert_se3(ego_from_this)
        ground = np.concatenate([rng.uniform(-7.5, 7.5, size=(60, 2)), np.full((60, 1), 0.05),
                                 rng.uniform(size=(60, 1))], axis=1)
        cloud_ego = np.concatenate([_box_surface_points(GT_BOXES, rng), ground])
        points.append(transform_points(this_from_ego, cloud_ego).astype(np.float32))
        agent_gt.append(transform_boxes(this_from_ego, GT_BOXES))
    return CoopSample(points=tuple(points), ego_from_agent=ego_from_agent, gt_boxes=GT_BOXES.copy(),
                      agent_gt_boxes=tuple(agent_gt))


def _empty_sample(agents: int = 2) -> CoopSample:
    ego_from_agent = np.stack([np.eye(4), EGO_FROM_AGENT1][:agents])
    return CoopSample(points=tuple(np.zeros((0, 4), np.float32) for _ in range(agents)),
                      ego_from_agent=ego_from_agent, gt_boxes=np.zeros((0, 7)),
                      agent_gt_boxes=tuple(np.zeros((0, 7)) for _ in range(agents)))


TRAIN_CONFIG = OptimConfig(steps=60, lr=3e-3, rotate_scene=False, mirror_probability=0.0, checkpoint_every=1000)


@dataclass(frozen=True)
class TrainedRun:
    """What the shared 60-step training run left behind (tests must not train ``detector`` further)."""

    detector: BevDetector
    losses: list[float]
    steps_seen: list[int]
    checkpoint: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """A detector overfitted to :func:`_coop_sample` on the small grid (about a second on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        detector = _detector(grid=SMALL_GRID_CONFIG)
        checkpoint = tmp_path_factory.mktemp("trained") / "c.pt"
        steps_seen: list[int] = []
        losses = train(detector, [_coop_sample()], TRAIN_CONFIG, checkpoint,
                       on_step=lambda step, _: steps_seen.append(step))
    finally:
        torch.set_num_threads(threads)
    return TrainedRun(detector, losses, steps_seen, checkpoint)


# ------------------------------------------------------------------------------------------------
# Registry sweep


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_builds_runs_and_trains_one_step(name: str) -> None:
    detector = _detector(name)
    assert detector.stride == detector.config.feature_reduction == 4
    reduction = detector.stride
    clouds = _random_clouds(detector.grid, (500, 300))

    detector.train()
    features = detector.features(clouds)
    assert features.shape == (2, 16, 64 // reduction, 64 // reduction)
    assert torch.isfinite(features).all()

    # The backbone's levels have the channels and strides its feature_info declares.
    encoder_out = detector.encoder(clouds)
    assert encoder_out.shape == (2, 8, 64, 64)
    levels = detector.backbone.backbone(encoder_out)
    info = detector.backbone.backbone.feature_info
    assert len(levels) == len(info)
    for level, spec in zip(levels, info, strict=True):
        assert level.shape == (2, spec["num_chs"], 64 // spec["reduction"], 64 // spec["reduction"])

    sample = _coop_sample()
    parts = sample_loss(detector, sample, fused_weight=1.0, early=True)
    assert set(parts) == {"single", "fused", "total"}
    assert all(torch.isfinite(v) for v in parts.values())
    assert float(parts["total"].detach()) > 0.0
    detector.zero_grad(set_to_none=True)
    parts["total"].backward()
    grads = [p.grad for p in detector.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    assert all(torch.isfinite(p).all() for p in detector.parameters())


def test_unknown_backbone_is_refused_with_the_known_names() -> None:
    with pytest.raises(ValueError, match="no_such_net") as error:
        build_detector(_config("no_such_net"))
    assert all(name in str(error.value) for name in list_backbones())


@pytest.mark.parametrize("merge", ["max", "attention", "context"])
def test_fuse_with_identity_poses_of_one_agent_returns_its_features(merge: str) -> None:
    detector = _detector(grid=SMALL_GRID_CONFIG, merge=merge).eval()
    features = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    fused = detector.fuse(features, torch.eye(4)[None])
    assert torch.equal(fused, features)


# ------------------------------------------------------------------------------------------------
# Empty inputs and fusion modes


def test_empty_cloud_gives_zero_image_and_no_detections(trained: TrainedRun) -> None:
    detector = trained.detector
    assert not detector.training
    empty = torch.zeros(0, 4)
    with torch.no_grad():
        assert torch.equal(detector.encoder([empty]), torch.zeros(1, 8, 32, 32))
    alone = CoopSample(points=(np.zeros((0, 4), np.float32),), ego_from_agent=np.eye(4)[None], gt_boxes=np.zeros((0, 7)))
    for mode in FUSION_MODES:
        assert detect_sample(detector, alone, mode).shape == (0, 8)
    # The same detector does find the objects it was trained on (so "nothing" above means something).
    found = detect_sample(detector, _coop_sample(), "none")
    assert len(found) >= 2


def test_untrained_detector_on_empty_cloud_runs_in_eval_mode() -> None:
    # The heat-map prior is 0.1 (the default threshold), so only shapes are meaningful untrained.
    detector = _detector().eval()
    with torch.no_grad():
        detections = detector.detect(detector.features([torch.zeros(0, 4), torch.zeros(0, 4)]),
                                     score_threshold=0.2)
    assert [d.shape for d in detections] == [(0, 9), (0, 9)]


@pytest.mark.parametrize("mode", FUSION_MODES)
def test_all_empty_agents_give_no_boxes_in_every_mode(mode: str, trained: TrainedRun) -> None:
    boxes = detect_sample(trained.detector, _empty_sample(), mode)
    assert boxes.shape == (0, 8)


def test_one_point_in_training_mode_does_not_break_batch_norm() -> None:
    detector = _detector(grid=SMALL_GRID_CONFIG).train()
    features = detector.features([torch.tensor([[1.0, 2.0, 0.5, 0.7]])])
    assert features.shape == (1, 16, 8, 8)
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("mode", FUSION_MODES)
def test_detect_sample_returns_ego_frame_boxes_in_every_mode(mode: str) -> None:
    detector = _detector(grid=SMALL_GRID_CONFIG).eval()
    sample = _coop_sample()
    boxes = detect_sample(detector, sample, mode, score_threshold=0.0)  # untrained: keep every peak
    assert boxes.ndim == 2 and boxes.shape[1] == 8 and len(boxes) > 0
    assert boxes.dtype == np.float64
    assert np.isfinite(boxes).all()
    assert np.all(boxes[:, 7] > 0.0)
    if mode != "late":
        assert np.all(np.diff(boxes[:, 7]) <= 0)  # sorted by score
    assert np.all(np.abs(boxes[:, 6]) <= math.pi + 1e-6)


def test_late_fusion_moves_agent_boxes_into_the_ego_frame(trained: TrainedRun) -> None:
    # An ego with no points and an agent that sees everything: late fusion returns the agent's boxes,
    # moved by ego_from_agent (checked against detecting in the agent's own frame).
    detector = trained.detector
    sample = _coop_sample()
    blind_ego = CoopSample(points=(np.zeros((0, 4), np.float32), sample.points[1]),
                           ego_from_agent=sample.ego_from_agent, gt_boxes=sample.gt_boxes)
    late = detect_sample(detector, blind_ego, "late")
    alone = detect_sample(detector, CoopSample(points=(sample.points[1],), ego_from_agent=np.eye(4)[None],
                                               gt_boxes=np.zeros((0, 7))), "none")
    assert len(late) == len(alone) > 0
    expected = transform_boxes(EGO_FROM_AGENT1, alone)
    order = np.argsort(-late[:, 7], kind="stable")
    np.testing.assert_allclose(late[order][:, :6], expected[:, :6], atol=1e-5)
    np.testing.assert_allclose(wrap_angle_rad(late[order][:, 6] - expected[:, 6]), 0.0, atol=1e-5)
    np.testing.assert_allclose(late[order][:, 7], expected[:, 7], atol=1e-6)


def test_unknown_fusion_mode_names_the_modes() -> None:
    detector = _detector(grid=SMALL_GRID_CONFIG).eval()
    with pytest.raises(ValueError, match="telepathy") as error:
        detect_sample(detector, _coop_sample(), "telepathy")
    assert all(mode in str(error.value) for mode in FUSION_MODES)


# ------------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    detector = _detector(grid=SMALL_GRID_CONFIG)
    # Non-default batch-norm statistics, so buffers are part of what must survive.
    detector.train()
    with torch.no_grad():
        detector.features(_random_clouds(detector.grid, (400, 400), seed=3))
    detector.eval()
    save_checkpoint(tmp_path / "sub" / "d.pt", detector, step=7)
    loaded, extra = load_checkpoint(tmp_path / "sub" / "d.pt", detector.config)
    assert extra == {"step": 7}
    assert loaded.config == detector.config
    loaded.eval()
    clouds = _random_clouds(detector.grid, (300, 200), seed=4)
    with torch.no_grad():
        a, b = detector.features(clouds), loaded.features(clouds)
        assert torch.equal(a, b)
        out_a, out_b = detector(a), loaded(b)
    assert torch.equal(out_a.heatmap, out_b.heatmap) and torch.equal(out_a.size, out_b.size)
    for mode in FUSION_MODES:
        np.testing.assert_array_equal(detect_sample(detector, _coop_sample(), mode, score_threshold=0.0),
                                      detect_sample(loaded, _coop_sample(), mode, score_threshold=0.0))


def test_loading_with_another_backbone_names_both(tmp_path: Path) -> None:
    path = tmp_path / "d.pt"
    save_checkpoint(path, _detector("mobiledet_tiny", SMALL_GRID_CONFIG))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, _config("nextvit_tiny", SMALL_GRID_CONFIG))
    message = str(error.value)
    assert "backbone" in message and "'nextvit_tiny'" in message and "'mobiledet_tiny'" in message
    assert str(path) in message


def test_loading_with_other_feature_channels_names_both(tmp_path: Path) -> None:
    path = tmp_path / "d.pt"
    save_checkpoint(path, _detector(grid=SMALL_GRID_CONFIG))
    wanted = DetectorConfig(backbone="mobiledet_tiny", grid=SMALL_GRID_CONFIG, pillar_channels=8,
                            feature_channels=24, head_channels=16)
    with pytest.raises(CheckpointError, match=r"feature_channels: wanted 24, checkpoint has 16"):
        load_checkpoint(path, wanted)


def test_weights_of_another_backbone_under_this_config_name_the_backbone(tmp_path: Path) -> None:
    path = tmp_path / "lying.pt"
    other = _detector("nextvit_tiny", SMALL_GRID_CONFIG)
    claimed = _config("mobiledet_tiny", SMALL_GRID_CONFIG)
    torch.save({"config": claimed.model_dump(mode="json"), "state_dict": other.state_dict()}, path)
    with pytest.raises(CheckpointError, match="'mobiledet_tiny'") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n", bytes(range(256)) * 4],
                         ids=["empty", "text", "binary"])
def test_garbage_file_raises_checkpoint_error_naming_the_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def test_truncated_missing_and_incomplete_checkpoints_raise_checkpoint_error(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    save_checkpoint(good, _detector(grid=SMALL_GRID_CONFIG))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    no_weights = tmp_path / "no_weights.pt"
    torch.save({"config": _config(grid=SMALL_GRID_CONFIG).model_dump(mode="json")}, no_weights)
    not_a_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_dict)
    for path in (truncated, tmp_path / "missing.pt", no_weights, not_a_dict):
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(path)
        assert str(path) in str(error.value)


# ------------------------------------------------------------------------------------------------
# Training


def test_short_training_run_lowers_the_loss(trained: TrainedRun) -> None:
    losses = trained.losses
    assert len(losses) == 60 and trained.steps_seen == list(range(1, 61))
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), losses
    assert not trained.detector.training
    assert trained.checkpoint.exists()
    _, extra = load_checkpoint(trained.checkpoint, trained.detector.config)
    assert extra["step"] == 60


def _assert_finds_gt(boxes: np.ndarray, context: str) -> None:
    for gt in GT_BOXES:
        distance_m = np.hypot(boxes[:, 0] - gt[0], boxes[:, 1] - gt[1]) if len(boxes) else np.array([np.inf])
        assert distance_m.min() < 1.5, (context, gt, boxes[:, :2])


def test_trained_detector_finds_the_boxes_in_every_mode(trained: TrainedRun) -> None:
    sample = _coop_sample()
    for mode in FUSION_MODES:
        _assert_finds_gt(detect_sample(trained.detector, sample, mode), mode)


@pytest.mark.parametrize("mode", ["late", "early", "intermediate"])
def test_blind_ego_sees_through_the_other_agent(mode: str, trained: TrainedRun) -> None:
    # The ego has no points: whatever it finds came from agent 1, moved into the ego frame.
    sample = _coop_sample()
    blind_ego = CoopSample(points=(np.zeros((0, 4), np.float32), sample.points[1]),
                           ego_from_agent=sample.ego_from_agent, gt_boxes=sample.gt_boxes)
    _assert_finds_gt(detect_sample(trained.detector, blind_ego, mode), mode)


def test_resume_continues_from_the_saved_step(trained: TrainedRun, tmp_path: Path) -> None:
    checkpoint = tmp_path / "c.pt"
    checkpoint.write_bytes(trained.checkpoint.read_bytes())
    fresh = _detector(grid=SMALL_GRID_CONFIG, seed=1)  # weights come from the checkpoint, not from here
    steps_seen: list[int] = []
    longer = TRAIN_CONFIG.model_copy(update={"steps": 70})
    more = train(fresh, [_coop_sample()], longer, checkpoint, resume=True,
                 on_step=lambda step, _: steps_seen.append(step))
    assert len(more) == 10 and steps_seen == list(range(61, 71))  # only the remaining steps
    assert all(math.isfinite(v) for v in more)
    assert np.mean(more) < 0.5 * np.mean(trained.losses[:10])  # it continued from trained weights
    _, extra = load_checkpoint(checkpoint, fresh.config)
    assert extra["step"] == 70


def test_resume_from_a_finished_run_does_nothing(tmp_path: Path) -> None:
    detector = _detector(grid=SMALL_GRID_CONFIG)
    checkpoint = tmp_path / "c.pt"
    config = OptimConfig(steps=2, rotate_scene=False, mirror_probability=0.0, early_fusion_loss=False)
    assert len(train(detector, [_coop_sample()], config, checkpoint)) == 2
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    assert train(detector, [_coop_sample()], config, checkpoint, resume=True) == []
    assert all(torch.equal(before[k], v) for k, v in detector.state_dict().items())


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path: Path) -> None:
    checkpoint = tmp_path / "c.pt"
    save_checkpoint(checkpoint, _detector("nextvit_tiny", SMALL_GRID_CONFIG), step=1)
    with pytest.raises(CheckpointError, match="nextvit_tiny"):
        train(_detector(grid=SMALL_GRID_CONFIG), [_coop_sample()], OptimConfig(steps=3), checkpoint, resume=True)


def _second_stage(detector: BevDetector, sample: CoopSample, trains: str, checkpoint: Path
                  ) -> tuple[float, list[float], set[str]]:
    """30 steps of a second stage on one sample: the fused loss before, the losses, the weights changed."""
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    with torch.no_grad():
        first = float(sample_loss(detector.eval(), sample, 1.0, fused_only=True)["fused"])
    config = OptimConfig(steps=30, lr=3e-3, rotate_scene=False, mirror_probability=0.0, trains=trains,
                         checkpoint_every=1000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = train(detector, [sample], config, checkpoint)
    finally:
        torch.set_num_threads(threads)
    after = detector.state_dict()
    return first, losses, {k for k in after if not torch.equal(before[k], after[k])}


def test_merge_stage_trains_only_the_new_merge_and_lowers_the_fused_loss(trained: TrainedRun, tmp_path: Path) -> None:
    # A second stage on the trained detector: a context merge, everything else frozen.
    detector = build_detector(trained.detector.config.model_copy(update={"merge": "context"}))
    fresh = init_from_checkpoint(detector, trained.checkpoint)
    assert fresh and all(k.startswith("merge.") for k in fresh)
    sample = _coop_sample()
    first, losses, changed = _second_stage(detector, sample, "merge", tmp_path / "stage2.pt")
    assert changed and all(k.startswith("merge.") for k in changed), sorted(changed)[:5]  # BN statistics too
    assert all(p.requires_grad for p in detector.parameters())  # nothing is left frozen after training
    assert math.isfinite(losses[-1]) and np.mean(losses[-5:]) < first, (first, losses[-5:])
    single = detect_sample(detector, sample, "late")  # the single-agent paths are the trained detector's
    assert np.allclose(single, detect_sample(trained.detector, sample, "late"))


def test_merge_stage_refuses_a_detector_without_merge_weights(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="merge: attention or context"):
        train(_detector(grid=SMALL_GRID_CONFIG, merge="max"), [_coop_sample()],
              OptimConfig(steps=1, trains="merge"), tmp_path / "unused.pt")


def test_fused_stage_starts_as_the_single_agent_head_and_trains_only_the_intermediate_path(
        trained: TrainedRun, tmp_path: Path) -> None:
    # The fused map's own refinement and head start as copies of the single-agent ones: at first every
    # fusion mode detects exactly what the trained detector does.
    detector = build_detector(trained.detector.config.model_copy(update={"merge": "context", "fused_head": True}))
    fresh = init_from_checkpoint(detector, trained.checkpoint)
    assert fresh and all(k.startswith("merge.") for k in fresh)  # the fused head came from the checkpoint
    reference = build_detector(trained.detector.config.model_copy(update={"merge": "context"}))
    init_from_checkpoint(reference, trained.checkpoint)
    reference.merge.load_state_dict(detector.merge.state_dict())
    sample = _coop_sample()
    detector.eval(), reference.eval()
    assert np.allclose(detect_sample(detector, sample, "intermediate"), detect_sample(reference, sample, "intermediate"))
    first, losses, changed = _second_stage(detector, sample, "fused", tmp_path / "fused.pt")
    assert any(k.startswith("fused_head.") for k in changed) and any(k.startswith("fused_refine.") for k in changed)
    assert all(k.startswith(("merge.", "fused_refine.", "fused_head.")) for k in changed), sorted(changed)[:5]
    assert math.isfinite(losses[-1]) and np.mean(losses[-5:]) < first, (first, losses[-5:])
    for mode in ("none", "late", "early"):  # the single-agent head is untouched
        assert np.allclose(detect_sample(detector, sample, mode), detect_sample(trained.detector, sample, mode))
    loaded, _ = load_checkpoint(tmp_path / "fused.pt", detector.config)
    assert np.allclose(detect_sample(loaded.eval(), sample, "intermediate"),
                       detect_sample(detector, sample, "intermediate"))


def test_fused_hint_starts_as_the_checkpoint_and_carries_each_agents_own_heat_map(
        trained: TrainedRun, tmp_path: Path) -> None:
    # A fused stage with the hint, started from one without: the hint's weights are zero, so it detects
    # exactly what its checkpoint does; the hint channel is the agents' own heat-maps, merged by max.
    plain = build_detector(trained.detector.config.model_copy(update={"merge": "context", "fused_head": True}))
    init_from_checkpoint(plain, trained.checkpoint)
    torch.nn.init.normal_(plain.fused_refine[0].conv.weight, std=0.05)  # unlike the single-agent copy
    save_checkpoint(tmp_path / "plain.pt", plain)
    hinted = build_detector(plain.config.model_copy(update={"fused_hint": True}))
    assert init_from_checkpoint(hinted, tmp_path / "plain.pt") == ["hint.gain"]
    sample = _coop_sample()
    plain.eval(), hinted.eval()
    assert np.allclose(detect_sample(hinted, sample, "intermediate"), detect_sample(plain, sample, "intermediate"))
    with torch.no_grad():
        features = hinted.features([torch.from_numpy(p) for p in sample.points])
        own = torch.sigmoid(hinted.infer(features).heatmap)  # [2, 1, h, w]
        alone = hinted.fuse(features[:1], torch.eye(4)[None])
        assert alone.shape[1] == features.shape[1] + 1
        assert torch.allclose(alone[:, :-1], features[:1]) and torch.allclose(alone[:, -1:], own[:1])
        # Two agents on one spot: the hint is the larger of their heat-maps; an agent whose cells did not
        # arrive adds nothing to it.
        both = hinted.fuse(features, torch.eye(4).repeat(2, 1, 1))
        assert torch.allclose(both[:, -1:], own.amax(dim=0, keepdim=True))
        valid = torch.ones(2, 1, *features.shape[2:])
        valid[1] = 0
        assert torch.allclose(hinted.fuse(features, torch.eye(4).repeat(2, 1, 1), valid)[:, -1:], own[:1])
    first, losses, changed = _second_stage(hinted, sample, "fused", tmp_path / "hinted.pt")
    assert "hint.gain" in changed and "fused_refine.0.conv.weight" in changed
    assert all(k.startswith(("merge.", "fused_refine.", "fused_head.", "hint.")) for k in changed), sorted(changed)[:5]
    assert math.isfinite(losses[-1]) and np.mean(losses[-5:]) < first, (first, losses[-5:])
    loaded, _ = load_checkpoint(tmp_path / "hinted.pt", hinted.config)
    assert np.allclose(detect_sample(loaded.eval(), sample, "intermediate"), detect_sample(hinted, sample, "intermediate"))


def test_fused_hint_needs_a_fused_head() -> None:
    with pytest.raises(ValueError, match="fused_hint .* needs fused_head: true"):
        _config("mobiledet_tiny", SMALL_GRID_CONFIG, merge="context", fused_hint=True)


def test_fused_stage_refuses_a_detector_without_a_fused_head(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fused_head: true"):
        train(_detector(grid=SMALL_GRID_CONFIG, merge="context"), [_coop_sample()],
              OptimConfig(steps=1, trains="fused"), tmp_path / "unused.pt")


def test_init_from_refuses_a_detector_that_differs_beyond_its_merge(tmp_path: Path) -> None:
    checkpoint = tmp_path / "c.pt"
    save_checkpoint(checkpoint, _detector("nextvit_tiny", SMALL_GRID_CONFIG), step=1)
    with pytest.raises(CheckpointError, match="backbone: this config has 'mobiledet_tiny', the checkpoint 'nextvit_tiny'"):
        init_from_checkpoint(_detector(grid=SMALL_GRID_CONFIG, merge="context"), checkpoint)


# ------------------------------------------------------------------------------------------------
# Augmentations


def _agent_boxes_in_ego(sample: CoopSample) -> list[np.ndarray]:
    return [transform_boxes(m, b) for m, b in zip(sample.ego_from_agent, sample.agent_gt_boxes, strict=True)]


def _assert_boxes_close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-9)
    np.testing.assert_allclose(wrap_angle_rad(a[:, 6] - b[:, 6]), 0.0, atol=1e-9)


@pytest.mark.parametrize("lattice_m", [0.0, 2.0])
def test_rotate_scene_keeps_the_scene_consistent_and_frames_on_the_lattice(lattice_m: float) -> None:
    sample = _coop_sample()
    turned = rotate_scene(sample, 0.7, lattice_m)
    ego_turn = se3_from_xyz_rpy(0.0, 0.0, 0.0, 0.0, 0.0, 0.7)  # new_ego_from_old_ego
    expected_gt = transform_boxes(ego_turn, sample.gt_boxes)
    _assert_boxes_close(turned.gt_boxes, expected_gt)
    np.testing.assert_allclose(turned.ego_from_agent[0], np.eye(4), atol=1e-12)
    for j, boxes_in_ego in enumerate(_agent_boxes_in_ego(turned)):
        _assert_boxes_close(boxes_in_ego, expected_gt)
        # Every agent's frame is a pure shift from the ego's, by whole lattice steps.
        np.testing.assert_allclose(turned.ego_from_agent[j][:3, :3], np.eye(3), atol=1e-12)
        if lattice_m:
            steps = turned.ego_from_agent[j][:2, 3] / lattice_m
            np.testing.assert_allclose(steps, np.round(steps), atol=1e-9)
        points_in_ego = transform_points(turned.ego_from_agent[j], turned.points[j])
        original_in_ego = transform_points(ego_turn @ sample.ego_from_agent[j], sample.points[j])
        np.testing.assert_allclose(points_in_ego, original_in_ego, atol=1e-4)  # float32 points
        assert turned.points[j].dtype == np.float32
    # The agent sits under half a lattice step from its frame's origin.
    agent_origin = transform_points(invert_se3(turned.ego_from_agent[1]) @ ego_turn @ sample.ego_from_agent[1],
                                    np.zeros((1, 3)))
    assert np.all(np.abs(agent_origin[0, :2]) <= lattice_m / 2 + 1e-9)


def test_jitter_frames_moves_each_frame_off_the_lattice_and_keeps_the_scene_consistent() -> None:
    sample = _coop_sample()
    lattice_m, yaw_deg = 0.8, 1.0
    moved = jitter_frames(sample, random.Random(3), lattice_m, yaw_deg)
    np.testing.assert_allclose(moved.ego_from_agent[0], np.eye(4), atol=1e-12)
    shifts = []
    for j, boxes_in_ego in enumerate(_agent_boxes_in_ego(moved)):
        _assert_boxes_close(boxes_in_ego, moved.gt_boxes)  # every agent still agrees on where things are
        # The points, placed in the ego frame, sit where the moved ground truth says the scene is.
        new_from_old = invert_se3(moved.ego_from_agent[j]) @ _ego_move(sample, moved) @ sample.ego_from_agent[j]
        np.testing.assert_allclose(transform_points(new_from_old, sample.points[j]), moved.points[j], atol=1e-4)
        delta = np.array([new_from_old[0, 3], new_from_old[1, 3], math.atan2(new_from_old[1, 0], new_from_old[0, 0])])
        assert np.all(np.abs(delta[:2]) <= lattice_m / 2 + 1e-9) and abs(np.rad2deg(delta[2])) <= yaw_deg + 1e-9
        shifts.append(delta)
        assert moved.points[j].dtype == np.float32
    assert np.all(np.abs(np.array(shifts)[:, :2]) > 1e-3)  # off the lattice, not a no-op
    # Relative placement between the agents' frames is no longer whole lattice steps.
    steps = moved.ego_from_agent[1][:2, 3] / lattice_m
    assert not np.allclose(steps, np.round(steps), atol=1e-3)


def _ego_move(sample: CoopSample, moved: CoopSample) -> np.ndarray:
    """``new_ego_from_old_ego``: recovered from one scored box before and after (boxes move rigidly)."""
    before, after = sample.gt_boxes[0], moved.gt_boxes[0]
    turn = float(wrap_angle_rad(after[6] - before[6]))
    rotation = se3_from_xyz_rpy(0.0, 0.0, 0.0, 0.0, 0.0, turn)
    rotated = transform_points(rotation, before[None, :3])[0]
    return se3_from_xyz_rpy(*(after[:3] - rotated), 0.0, 0.0, turn)


def test_mirror_keeps_the_scene_consistent_and_twice_is_identity() -> None:
    sample = _coop_sample()
    mirrored = mirror(sample)
    flipped_gt = sample.gt_boxes * [1, -1, 1, 1, 1, 1, -1]
    _assert_boxes_close(mirrored.gt_boxes, flipped_gt)
    for boxes_in_ego in _agent_boxes_in_ego(mirrored):
        _assert_boxes_close(boxes_in_ego, flipped_gt)
    for m in mirrored.ego_from_agent:  # still proper rigid motions
        np.testing.assert_allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-12)
        assert np.linalg.det(m[:3, :3]) == pytest.approx(1.0)

    twice = mirror(mirrored)
    np.testing.assert_array_equal(twice.ego_from_agent, sample.ego_from_agent)
    np.testing.assert_array_equal(twice.gt_boxes, sample.gt_boxes)
    for a, b in zip(twice.points, sample.points, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(twice.agent_gt_boxes, sample.agent_gt_boxes, strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# Pillars


GRID_8 = BevGrid(x_min_m=-4.0, x_max_m=4.0, y_min_m=-4.0, y_max_m=4.0, cell_size_m=1.0, z_min_m=-1.0, z_max_m=3.0)


def _probe_encoder() -> PillarEncoder:
    """An encoder whose channels read point features directly: intensity, +-x offset, +-y offset, z offset."""
    encoder = PillarEncoder(GRID_8, out_channels=6).eval()  # eval: running stats (mean 0, var 1)
    weight = torch.zeros(6, 7)
    weight[0, 3] = 1.0  # intensity
    weight[1, 4], weight[2, 4] = 1.0, -1.0  # x offset from the pillar centre (cells)
    weight[3, 5], weight[4, 5] = 1.0, -1.0  # y offset
    weight[5, 6] = 1.0  # z above the middle of the height band
    with torch.no_grad():
        encoder.point_net[0].weight.copy_(weight)
        encoder.point_net[1].eps = 0.0
    return encoder


def test_pillar_encoder_puts_a_point_in_its_cell_only() -> None:
    encoder = _probe_encoder()
    # x = 1.3 -> column 5 (x in [1, 2), centre 1.5); y = -2.2 -> row 1 (y in [-3, -2), centre -2.5).
    image = encoder([torch.tensor([[1.3, -2.2, 2.0, 0.75]])])
    assert image.shape == (1, 6, 8, 8)
    torch.testing.assert_close(image[0, :, 1, 5], torch.tensor([0.75, 0.0, 0.2, 0.3, 0.0, 1.0]))
    others = image.clone()
    others[0, :, 1, 5] = 0.0
    assert torch.count_nonzero(others) == 0


def test_pillar_encoder_batches_and_takes_the_max_per_cell() -> None:
    encoder = _probe_encoder()
    clouds = [torch.tensor([[-3.9, -3.9, 0.0, 0.25], [-3.5, -3.1, 0.0, 0.5]]),  # both in row 0, col 0
              torch.tensor([[3.99, 3.99, 0.0, 0.9]])]  # last cell
    image = encoder(clouds)
    assert image.shape == (2, 6, 8, 8)
    assert float(image[0, 0, 0, 0]) == pytest.approx(0.5)
    assert float(image[1, 0, 7, 7]) == pytest.approx(0.9)
    assert torch.count_nonzero(image[0, 0]) == 1 and torch.count_nonzero(image[1, 0]) == 1


def test_pillar_encoder_ignores_points_outside_the_grid_or_height_band() -> None:
    encoder = _probe_encoder()
    outside = torch.tensor([
        [4.0, 0.5, 1.0, 1.0],  # x_max is exclusive
        [-4.01, 0.5, 1.0, 1.0],
        [0.5, 4.0, 1.0, 1.0],
        [0.5, -7.0, 1.0, 1.0],
        [0.5, 0.5, 3.0, 1.0],  # z_max is exclusive
        [0.5, 0.5, -1.5, 1.0],
    ])
    assert torch.count_nonzero(encoder([outside])) == 0
    # The lower edges are inside: x = y = -4 lands in cell (0, 0), z = z_min counts.
    edge = encoder([torch.cat([outside, torch.tensor([[-4.0, -4.0, -1.0, 1.0]])])])
    assert torch.nonzero(edge[0, 0]).tolist() == [[0, 0]]


def test_bfloat16_inference_keeps_types_and_nearly_the_float32_numbers(trained: TrainedRun) -> None:
    detector = trained.detector
    sample = _coop_sample()
    clouds = [torch.from_numpy(p) for p in sample.points]
    try:
        assert detector.set_precision("float32") == "float32"
        with torch.no_grad():
            reference = detector.features(clouds)
            reference_boxes = detector.detect(reference)[0]
        assert detector.set_precision("bfloat16") == "bfloat16"
        with torch.no_grad():
            features = detector.features(clouds)
            boxes = detector.detect(features)[0]
        assert features.dtype == torch.float32 and boxes.dtype == torch.float32
        assert not torch.equal(features, reference)  # bfloat16 was really used
        torch.testing.assert_close(features, reference, rtol=0.05, atol=0.05 * float(reference.abs().max()))
        assert len(boxes) == len(reference_boxes)
        torch.testing.assert_close(boxes[:, :2], reference_boxes[:, :2], rtol=0.0, atol=0.1)  # metres
        assert detector.set_precision("auto") in ("float32", "bfloat16")
        with pytest.raises(ValueError, match="float16"):
            detector.set_precision("float16")
    finally:
        detector.set_precision("float32")


COMMITTED = Path(__file__).resolve().parent.parent / "models" / "checkpoints"


@pytest.mark.parametrize("fused, base", [("mobiledet_tiny_fused.pt", "mobiledet_tiny.pt"),
                                         ("nextvit_tiny_fused.pt", "nextvit_tiny.pt")])
def test_committed_fused_head_checkpoints_keep_their_base_detector_for_everything_agents_compute(
        fused: str, base: str) -> None:
    with_head, _ = load_checkpoint(COMMITTED / fused)
    single, _ = load_checkpoint(COMMITTED / base)
    assert with_head.fused_head is not None and with_head.config.merge == "context"
    theirs = single.state_dict()
    own = {k: v for k, v in with_head.state_dict().items() if not k.startswith(("merge.", "fused_", "hint."))}
    assert own.keys() == {k for k in theirs if not k.startswith("merge.")}
    for name, value in own.items():
        assert torch.equal(value, theirs[name]), name
    # The fused head was trained away from the copy it started as.
    assert not torch.equal(with_head.state_dict()["fused_head.heatmap.2.weight"], theirs["head.heatmap.2.weight"])


def test_committed_weights_stay_within_the_20_mb_budget() -> None:
    assert sum(p.stat().st_size for p in COMMITTED.glob("*.pt")) <= 20_000_000


def test_set_decoder_changes_only_the_peak_rule_and_refuses_what_the_config_refuses() -> None:
    detector = _detector(grid=SMALL_GRID_CONFIG)
    before = detector.config
    detector.set_decoder(peak_ratio=1.0)
    assert detector.config == before.model_copy(update={"peak_ratio": 1.0})
    detector.set_decoder(peak_window=1)
    assert (detector.config.peak_window, detector.config.peak_ratio) == (1, 1.0)
    for bad in ({"peak_window": 2}, {"peak_ratio": 1.5}):
        with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
            detector.set_decoder(**bad)
    assert (detector.config.peak_window, detector.config.peak_ratio) == (1, 1.0)
