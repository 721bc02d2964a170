"""Training loop for the BEV detector on cooperative samples (single-agent and fused losses).

Each step takes one cooperative sample: every agent's features are computed
once; the head is trained on each agent's own features against what that
agent can see (this is the ``none``/``late``/``early`` path), and on the fused
features against what any agent sees (the ``intermediate`` path).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from models.cooperative import CoopSample, agent_features
from models.detector import BevDetector, CheckpointError, load_checkpoint, save_checkpoint
from models.geometry import (
    invert_se3,
    se3_from_xyz_rpy,
    transform_boxes,
    transform_points,
)
from models.head import build_targets, compute_loss

log = logging.getLogger(__name__)

_MIRROR = np.diag([1.0, -1.0, 1.0, 1.0])


class OptimConfig(BaseModel):
    """Optimisation settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(3000, ge=1)
    """Optimiser steps; one cooperative sample (all its agents) per step."""
    lr: float = Field(2e-3, gt=0.0)
    """Peak learning rate (one-cycle schedule)."""
    weight_decay: float = Field(1e-4, ge=0.0)
    fused_loss_weight: float = Field(1.0, ge=0.0)
    """Weight of the intermediate-fusion loss next to the single-agent losses."""
    mirror_probability: float = Field(0.5, ge=0.0, le=1.0)
    """Chance of mirroring a sample left-right (augmentation)."""
    rotate_scene: bool = True
    """Turn the whole world by a random yaw about the ego (augmentation): the world's streets have
    no preferred direction."""
    frame_jitter_probability: float = Field(0.0, ge=0.0, le=1.0)
    """Chance of moving every agent's BEV frame off the feature lattice (augmentation): each agent's
    frame is shifted by up to half a feature cell per axis and turned by up to ``frame_jitter_yaw_deg``,
    the relative poses staying exact. Agents build their frames from their own (noisy) poses, so in
    use the scene meets the pillar grid at any sub-cell offset and turn, and the others' features
    are resampled rather than moved by whole cells; without it the detector only ever sees the lattice
    phase of the world's axis-aligned streets."""
    frame_jitter_yaw_deg: float = Field(1.0, ge=0.0, le=10.0)
    """Largest turn of an agent's frame when ``frame_jitter_probability`` moves it (uniform)."""
    early_fusion_loss: bool = True
    """Also train on the ego-frame union of all agents' points (the ``early`` path)."""
    trains: Literal["all", "merge", "fused", "camera"] = "all"
    """``all``: every weight on the single-agent, early and fused losses. ``merge``: only the merge
    module, on the fused loss, everything else frozen (a second stage on a trained detector: the
    ``none``/``late``/``early`` paths and the features agents send stay exactly as they were).
    ``fused``: the merge and the fused map's own refinement and head (``detector.fused_head``), on the
    fused loss; the same second stage with more of the intermediate path to learn. ``camera``: only the
    camera path (``detector.camera``), on the single-agent and fused losses, everything else frozen: camera
    agents learn to speak into a trained LiDAR detector's feature space, which LiDAR agents keep unchanged."""
    seed: int = 0
    checkpoint_every: int = Field(250, ge=1)
    threads: int = Field(0, ge=0)
    """torch CPU threads (0: torch's default)."""


def mirror(sample: CoopSample) -> CoopSample:
    """The same scene seen in a mirror (y -> -y in every agent's frame).

    Raises:
        ValueError: the sample has camera agents (a mirrored camera is not a camera: ``train`` leaves
            their samples unmirrored).
    """
    if sample.camera_agents():
        raise ValueError("a sample with camera agents cannot be mirrored")
    def flip_boxes(boxes: np.ndarray) -> np.ndarray:
        out = boxes.copy()
        out[:, 1] *= -1
        out[:, 6] *= -1
        return out

    points = tuple(p * np.array([1, -1, 1, 1], dtype=p.dtype) for p in sample.points)
    return CoopSample(points=points, ego_from_agent=_MIRROR @ sample.ego_from_agent @ _MIRROR,
                      gt_boxes=flip_boxes(sample.gt_boxes),
                      agent_gt_boxes=tuple(flip_boxes(b) for b in sample.agent_gt_boxes))


def rotate_scene(sample: CoopSample, yaw_rad: float, lattice_m: float) -> CoopSample:
    """The same scene with the world turned by ``yaw_rad`` about the ego (augmentation).

    Agents' BEV frames keep world-aligned axes (:func:`models.bev.aligned_bev_frame`), so they
    turn with the world and each agent's origin moves back onto the ``lattice_m`` lattice: the
    agents' points turn about their own origins and shift by under half a lattice step.
    """
    turn = se3_from_xyz_rpy(0.0, 0.0, 0.0, 0.0, 0.0, float(yaw_rad))  # new_ego_from_old_ego
    new_ego_from_agent, new_from_old = [], []
    for ego_from_agent in sample.ego_from_agent:
        moved = turn @ ego_from_agent  # the agent's old frame in the new ego frame
        origin = np.eye(4)
        xy = moved[:2, 3]
        origin[:2, 3] = np.round(xy / lattice_m) * lattice_m if lattice_m > 0 else xy
        new_ego_from_agent.append(origin)
        new_from_old.append(invert_se3(origin) @ moved)
    points = tuple(transform_points(m, p).astype(np.float32) for m, p in zip(new_from_old, sample.points))
    return CoopSample(points=points, ego_from_agent=np.stack(new_ego_from_agent),
                      gt_boxes=transform_boxes(turn, sample.gt_boxes),
                      agent_gt_boxes=tuple(transform_boxes(m, b) for m, b in zip(new_from_old, sample.agent_gt_boxes)),
                      cameras=_moved_cameras(sample, new_from_old))


def _moved_cameras(sample: CoopSample, new_from_old: Sequence[np.ndarray]) -> tuple:
    return tuple(c.moved(m) if c is not None else None for c, m in zip(sample.cameras, new_from_old))


def jitter_frames(sample: CoopSample, rng: random.Random, lattice_m: float, yaw_deg: float) -> CoopSample:
    """The same scene with every agent's BEV frame moved by a random sub-cell shift (up to half of
    ``lattice_m`` per axis) and turn (up to ``yaw_deg``), the agents' relative poses kept exact.

    Each agent's points and boxes move into its new frame; the ego's boxes into the ego's new frame;
    ``ego_from_agent`` becomes ``P_ego @ ego_from_agent @ inv(P_agent)`` where ``P`` maps an agent's old
    frame to its new one.
    """
    moves = [se3_from_xyz_rpy(rng.uniform(-0.5, 0.5) * lattice_m, rng.uniform(-0.5, 0.5) * lattice_m, 0.0,
                              0.0, 0.0, float(np.deg2rad(rng.uniform(-yaw_deg, yaw_deg))))
             for _ in sample.points]
    points = tuple(transform_points(m, p).astype(np.float32) for m, p in zip(moves, sample.points))
    ego_from_agent = np.stack([moves[0] @ e @ invert_se3(m) for e, m in zip(sample.ego_from_agent, moves)])
    return CoopSample(points=points, ego_from_agent=ego_from_agent, gt_boxes=transform_boxes(moves[0], sample.gt_boxes),
                      agent_gt_boxes=tuple(transform_boxes(m, b) for m, b in zip(moves, sample.agent_gt_boxes)),
                      cameras=_moved_cameras(sample, moves))


def _fused_loss(detector: BevDetector, features: torch.Tensor, sample: CoopSample) -> torch.Tensor:
    """Detection loss on the agents' ``features`` merged in the ego frame, against all of the sample's boxes."""
    device = features.device
    fused = detector.fuse(features, torch.as_tensor(sample.ego_from_agent, dtype=torch.float32, device=device))
    targets = build_targets([sample.gt_boxes], [np.zeros(len(sample.gt_boxes), np.int64)],
                            detector.grid, detector.stride, detector.config.num_classes)
    return compute_loss(detector(fused, fused=True), targets.to(device))["total"]


def sample_loss(detector: BevDetector, sample: CoopSample, fused_weight: float,
                early: bool = False, fused_only: bool = False) -> dict[str, torch.Tensor]:
    """Single-agent losses over all agents (and the early-fused cloud) plus the weighted fused loss.

    With ``fused_only`` the features are computed without gradients and only the fused loss counts.
    """
    device = next(detector.parameters()).device
    if fused_only:
        with torch.no_grad():
            features = agent_features(detector, sample)
        fused = _fused_loss(detector, features, sample)
        return {"single": fused.new_zeros(()), "fused": fused, "total": fused}
    single_gt = list(sample.agent_gt_boxes)
    features = agent_features(detector, sample)  # [A, C, h, w]: LiDAR or camera agents
    if early and not sample.camera_agents():  # the union of all agents' points (there are none from cameras)
        union = np.concatenate([transform_points(m, p) for m, p in zip(sample.ego_from_agent, sample.points)])
        features = torch.cat([features, detector.features([torch.from_numpy(union.astype(np.float32)).to(device)])])
        single_gt.append(sample.gt_boxes)
    single_targets = build_targets(single_gt, [np.zeros(len(b), np.int64) for b in single_gt],
                                   detector.grid, detector.stride, detector.config.num_classes)
    single = compute_loss(detector(features), single_targets.to(device))["total"]
    fused = _fused_loss(detector, features[:len(sample.points)], sample)
    return {"single": single, "fused": fused, "total": single + fused_weight * fused}


def trained_modules(detector: BevDetector, trains: str) -> list[torch.nn.Module]:
    """The modules ``optim.trains`` trains: the whole detector, its merge, or its merge and fused head.

    Raises:
        ValueError: the detector lacks what a second stage trains (merge weights, a fused head).
    """
    if trains == "all":
        return [detector]
    if trains == "camera":
        if detector.camera is None:
            raise ValueError("trains: camera needs a detector with a camera path (detector.camera_backbone)")
        return [detector.camera]
    if detector.merge is None or not list(detector.merge.parameters()):
        raise ValueError(f"trains: {trains} needs a detector whose merge has weights (merge: attention or context)")
    if trains == "merge":
        return [detector.merge]
    if detector.fused_head is None:
        raise ValueError("trains: fused needs a detector with its own head for fused maps (detector.fused_head: true)")
    return [m for m in (detector.merge, detector.fused_refine, detector.fused_head, detector.hint) if m is not None]


def train(detector: BevDetector, samples: Sequence[CoopSample], config: OptimConfig, checkpoint: Path, *,
          resume: bool = False, on_step: Callable[[int, dict[str, float]], None] | None = None) -> list[float]:
    """Train in place, saving ``checkpoint`` every ``checkpoint_every`` steps and at the end.

    With ``resume``, weights, optimiser state and the step counter are read
    from ``checkpoint`` first. Returns the total loss per step.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    base_frozen = config.trains != "all"  # a second stage: the trained detector stays as it was
    second_stage = trained_modules(detector, config.trains)
    trained = [p for m in second_stage for p in m.parameters()]
    for p in detector.parameters():
        p.requires_grad_(not base_frozen)
    for p in trained:
        p.requires_grad_(True)
    optimiser = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.lr, total_steps=config.steps,
                                                   pct_start=0.1)
    start = 0
    if resume and checkpoint.exists():
        start = _resume(detector, optimiser, schedule, checkpoint)
        rng = random.Random(config.seed + start)
    losses: list[float] = []
    detector.train()
    if base_frozen:  # frozen parts keep their normalisation statistics too
        detector.eval()
        for module in second_stage:
            module.train()
    for step in range(start, config.steps):
        sample = samples[rng.randrange(len(samples))]
        if rng.random() < config.mirror_probability and not sample.camera_agents():
            sample = mirror(sample)
        if config.rotate_scene:
            sample = rotate_scene(sample, rng.uniform(-np.pi, np.pi), detector.feature_cell_m)
        if config.frame_jitter_probability and rng.random() < config.frame_jitter_probability:
            sample = jitter_frames(sample, rng, detector.feature_cell_m, config.frame_jitter_yaw_deg)
        parts = sample_loss(detector, sample, config.fused_loss_weight, early=config.early_fusion_loss,
                            fused_only=base_frozen and config.trains != "camera")
        optimiser.zero_grad(set_to_none=True)
        parts["total"].backward()
        torch.nn.utils.clip_grad_norm_(trained, 10.0)
        optimiser.step()
        schedule.step()
        values = {k: float(v.detach()) for k, v in parts.items()}
        losses.append(values["total"])
        if on_step is not None:
            on_step(step + 1, values)
        if step + 1 == config.steps:  # finished: the weights alone (what is committed), nothing to resume
            save_checkpoint(checkpoint, detector, step=step + 1)
        elif (step + 1) % config.checkpoint_every == 0:
            save_checkpoint(checkpoint, detector, step=step + 1, optimiser=optimiser.state_dict(),
                            schedule=schedule.state_dict())
    detector.eval()
    for p in detector.parameters():
        p.requires_grad_(True)
    return losses


_STAGE_FIELDS = {"merge", "fused_head", "fused_hint", "peak_window", "peak_ratio", "camera_backbone", "camera_reduction"}
"""Config fields a second stage may change relative to the detector it starts from."""


def init_from_checkpoint(detector: BevDetector, path: Path) -> list[str]:
    """Start ``detector`` from the weights of a trained detector that differs from it in the merge (and
    ``fused_head``, ``fused_hint``) only.

    The merge's weights are taken when the checkpoint has the same kind of merge; a fused map's own
    refinement and head, when the checkpoint has none, start as copies of its single-agent ones. A
    detector with ``fused_hint`` started from one without: the hint's input weights of the fused map's
    first layer and its gain start at zero, so it starts computing what the checkpoint computed.
    Returns the names of the weights that were not in the checkpoint (e.g. a new merge's).

    Raises:
        CheckpointError: the checkpoint is unreadable, was trained with another config (apart from
            ``merge``, ``fused_head`` and ``fused_hint``), or lacks weights other than the merge's and the
            hint's gain.
    """
    source, _ = load_checkpoint(path)
    ours = detector.config.model_dump(exclude=_STAGE_FIELDS)
    theirs = source.config.model_dump(exclude=_STAGE_FIELDS)
    if ours != theirs:
        raise CheckpointError(f"{path}: init_from needs a detector like this one apart from its merge: " + "; ".join(
            f"{k}: this config has {v!r}, the checkpoint {theirs.get(k)!r}" for k, v in ours.items() if theirs.get(k) != v))
    state = {k: v for k, v in source.state_dict().items()
             if not k.startswith("merge.") or source.config.merge == detector.config.merge}
    if detector.fused_head is not None and source.fused_head is None:
        state.update({f"fused_{k}": v.clone() for k, v in state.items() if k.startswith(("refine.", "head."))})
    ours_state = detector.state_dict()
    for key, value in list(state.items()):
        wanted = ours_state.get(key)
        if (wanted is not None and key.startswith("fused_") and value.ndim == 4 and wanted.shape[1] > value.shape[1]
                and wanted.shape[0] == value.shape[0] and wanted.shape[2:] == value.shape[2:]):
            state[key] = torch.cat([value, value.new_zeros(value.shape[0], wanted.shape[1] - value.shape[1],
                                                           *value.shape[2:])], dim=1)  # the hint's new inputs
    result = detector.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(("merge.", "hint.", "camera."))]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks {', '.join(missing[:4])}")
    return list(result.missing_keys)


def _resume(detector: BevDetector, optimiser, schedule, checkpoint: Path) -> int:
    blob = torch.load(checkpoint, map_location="cpu", weights_only=True)
    load_checkpoint(checkpoint, detector.config)  # raises a clear error on a config mismatch
    detector.load_state_dict(blob["state_dict"])
    if "optimiser" in blob:
        optimiser.load_state_dict(blob["optimiser"])
        # Keep this run's horizon: the saved one is the old step count, and `steps` may have grown.
        horizon = {k: v for k, v in schedule.state_dict().items() if k in ("total_steps", "_schedule_phases")}
        schedule.load_state_dict({**blob["schedule"], **horizon})
    log.info("resumed %s at step %d", checkpoint, blob.get("step", 0))
    return int(blob.get("step", 0))
