"""``cpstream train --config FILE``: train a BEV detector on synthetic worlds (or an OPV2V folder)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agents import WorldConfig
from agents.world.crossing import CrossingConfig, CrossingWorld
from launch.console import console, progress
from launch.datasets import scene_frames
from launch.samples import camera_sample, coop_sample, mixed_sample
from models.bev import BevGrid
from models.cooperative import CoopSample
from models.detector import DetectorConfig, build_detector
from models.train import OptimConfig, init_from_checkpoint, train, trained_modules

REPO_ROOT = Path(__file__).resolve().parent.parent


class TrainDataConfig(BaseModel):
    """Which frames to train on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path | None = None
    """An OPV2V-layout folder; when unset, synthetic worlds are generated."""
    first_seed: int = Field(1000, ge=0)
    """Training worlds use seeds first_seed .. first_seed + worlds - 1 (never the held-out seed 0)."""
    worlds: int = Field(20, ge=1)
    frame_stride: int = Field(4, ge=1)
    """Take every n-th frame (neighbouring frames are nearly the same)."""
    world: WorldConfig = WorldConfig(frames=60, camera={"count": 0})
    """The world settings (its seed is replaced per world)."""
    crossing: CrossingConfig | None = None
    """Train on the pole-camera crossing (:mod:`agents.world.crossing`; its seed replaced per world)
    instead of the town: camera agents, pedestrians within the plaza."""
    camera_agents: int = Field(0, ge=0)
    """In every town frame the last this many agents (after the ego, by id) sense with their cameras
    (``world.camera``) instead of their LiDAR (:func:`launch.samples.mixed_sample`)."""
    agent_counts: list[int] | None = None
    """Agents per world in turn (world k has ``agent_counts[k % len]``), so a fused model sees as
    many agents as it will meet; unset: ``world.agents`` for every world."""

    @model_validator(mode="after")
    def _counts_fit_the_world(self) -> TrainDataConfig:
        if self.agent_counts is not None:
            if not self.agent_counts:
                raise ValueError("agent_counts is empty; leave it out to use world.agents")
            for count in self.agent_counts:  # the world's own rules (range, roadside units) name what is wrong
                WorldConfig.model_validate({**self.world.model_dump(), "agents": count})
        return self

    def world_configs(self) -> list[WorldConfig]:
        """The synthetic worlds trained on, in order."""
        def one(k: int) -> WorldConfig:
            update: dict = {"seed": self.first_seed + k}
            if self.agent_counts is not None:
                update["agents"] = self.agent_counts[k % len(self.agent_counts)]
            return WorldConfig.model_validate({**self.world.model_dump(), **update})
        return [one(k) for k in range(self.worlds)]


class TrainConfig(BaseModel):
    """A training run: model, data, optimiser and where the weights go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    detector: DetectorConfig = DetectorConfig()
    data: TrainDataConfig = TrainDataConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: Path = Path("models/checkpoints/detector.pt")
    """Relative paths are taken from the repository root."""
    init_from: Path | None = None
    """Start from this trained detector's weights (a detector like this one apart from its merge; e.g.
    a second stage that trains only a new merge, ``optim.trains: merge``)."""


def load_train_config(path: Path) -> TrainConfig:
    return TrainConfig.model_validate(yaml.safe_load(path.read_text()) or {})


def crop(sample: CoopSample, grid: BevGrid) -> CoopSample:
    """Drop points outside the grid's height band and extent (they never reach a pillar)."""
    def keep(points: np.ndarray) -> np.ndarray:
        z_ok = (points[:, 2] >= grid.z_min_m) & (points[:, 2] < grid.z_max_m)
        return np.ascontiguousarray(points[z_ok & grid.contains(points)])

    return CoopSample(points=tuple(keep(p) for p in sample.points), ego_from_agent=sample.ego_from_agent,
                      gt_boxes=sample.gt_boxes, agent_gt_boxes=sample.agent_gt_boxes, cameras=sample.cameras)


def build_samples(data: TrainDataConfig, detector: DetectorConfig) -> list[CoopSample]:
    """Training samples in the BEV frames of ``detector`` (its grid and feature lattice)."""
    grid = detector.grid.build()
    lattice_m = detector.feature_cell_m
    if data.crossing is not None:
        return crossing_samples(data, grid, lattice_m)
    sources = [(data.data_dir, None)] if data.data_dir is not None else [(None, w) for w in data.world_configs()]
    samples: list[CoopSample] = []
    with progress() as bar:
        task = bar.add_task("building training samples", total=None)
        for folder, world in sources:
            count, frames = scene_frames(folder, world, frame_stride=data.frame_stride)
            bar.update(task, total=(bar.tasks[0].total or 0) + count)
            for frame in frames:
                sample = (mixed_sample(frame, grid, lattice_m, data.camera_agents) if data.camera_agents
                          else coop_sample(frame, grid, lattice_m))
                samples.append(crop(sample, grid))
                bar.advance(task)
    return samples


def crossing_samples(data: TrainDataConfig, grid: BevGrid, lattice_m: float) -> list[CoopSample]:
    """Camera samples of the crossings with seeds ``first_seed ..``: every pole's image, the people on the plaza."""
    samples = []
    with progress() as bar:
        task = bar.add_task("rendering crossings", total=data.worlds * len(range(0, data.crossing.frames, data.frame_stride)))
        for k in range(data.worlds):
            world = CrossingWorld(data.crossing.model_copy(update={"seed": data.first_seed + k}))
            for index in range(0, len(world), data.frame_stride):
                samples.append(camera_sample(world.frame(index), grid, lattice_m,
                                             area_half_m=world.config.half_size_m))
                bar.advance(task)
    return samples


def cmd_train(args: argparse.Namespace) -> int:
    config = load_train_config(args.config)
    checkpoint = config.checkpoint if config.checkpoint.is_absolute() else REPO_ROOT / config.checkpoint
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.optim.seed)  # the fresh weights too: a rerun of a config reproduces it
    detector = build_detector(config.detector)
    if config.init_from is not None:  # before the data, so a wrong file fails at once
        source = config.init_from if config.init_from.is_absolute() else REPO_ROOT / config.init_from
        fresh = init_from_checkpoint(detector, source)
        parts = sorted({"the fused hint's gain" if k.startswith("hint.") else "the camera path" if k.startswith("camera.")
                        else f"the {config.detector.merge} merge" for k in fresh})
        console.print(f"starting from {config.init_from} ({len(fresh)} new weights"
                      f"{': ' + ', '.join(parts) if parts else ''})")
    detector = detector.to(device)
    trained = trained_modules(detector, config.optim.trains)  # before the data: a wrong config fails at once
    start = time.perf_counter()
    samples = build_samples(config.data, config.detector)
    data_s = time.perf_counter() - start
    console.print(f"{len(samples)} samples in {data_s:.0f} s; training {config.detector.backbone} "
                  f"({config.optim.trains}) on {device} "
                  f"({sum(p.numel() for m in trained for p in m.parameters()) / 1e6:.3f} M parameters trained)")
    recent: list[float] = []
    with progress() as bar:
        task = bar.add_task("training", total=config.optim.steps)

        def on_step(step: int, losses: dict[str, float]) -> None:
            recent.append(losses["total"])
            del recent[:-50]
            bar.update(task, completed=step,
                       description=f"training loss {np.mean(recent):.3f}")
            if not console.is_terminal and step % 100 == 0:  # a log file gets a line now and then
                console.print(f"step {step}/{config.optim.steps} loss {np.mean(recent):.3f} "
                              f"({(time.perf_counter() - start) / 60:.1f} min)")

        losses = train(detector, samples, config.optim, checkpoint, resume=args.resume, on_step=on_step)
    total_s = time.perf_counter() - start
    first = np.mean(losses[:50]) if losses else float("nan")
    last = np.mean(losses[-50:]) if losses else float("nan")
    console.print(f"saved {checkpoint}; loss {first:.3f} -> {last:.3f}; wall time {total_s / 60:.1f} min "
                  f"(data {data_s:.0f} s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="train a BEV detector (weights and resume state in one checkpoint)")
    parser.add_argument("--config", type=Path, required=True, help="training YAML (see launch/configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint's saved step")
    parser.set_defaults(func=cmd_train)
