"""Information-bottleneck training of a :class:`~models.codec.FeatureCodec` on a frozen detector.

Loss per step = intermediate-fusion detection loss on the *decoded* features of every agent
+ ``rate_weights[level]`` x kilobytes per agent (the entropy model's bits)
+ ``feature_weight`` x mean squared error to the uncoded features (keeps early training stable).
A random rate level is drawn each step, so all levels share the transforms and each learns its
own gains and entropy model. The detector is frozen (its features are computed once, up front),
so the codec can be swapped without retraining, and uncoded fusion stays the reference.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.codec import CodecConfig, CodecError, FeatureCodec
from models.cooperative import CoopSample, agent_features
from models.detector import BevDetector, DetectorConfig
from models.head import build_targets, compute_loss

log = logging.getLogger(__name__)


class CodecOptimConfig(BaseModel):
    """Optimisation settings for the codec."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(2000, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    rate_weights: tuple[float, ...] = (1.0, 0.4, 0.16, 0.06, 0.02)
    """Per rate level (0 = fewest bytes): loss per kilobyte per agent-frame (the beta of the bottleneck)."""
    feature_weight: float = Field(0.1, ge=0.0)
    entropy_lr_factor: float = Field(10.0, gt=0.0)
    """The entropy models and gains learn this much faster than the transforms (they start far off)."""
    seed: int = 0
    checkpoint_every: int = Field(250, ge=1)
    threads: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _decreasing(self) -> CodecOptimConfig:
        if any(b >= a for a, b in zip(self.rate_weights, self.rate_weights[1:])):
            raise ValueError(f"rate_weights must decrease from level 0 up, got {self.rate_weights}")
        return self


@dataclass(frozen=True, slots=True)
class FeatureSample:
    """A cooperative sample with every agent's (frozen) features already computed."""

    features: torch.Tensor  # [A, C, h, w] float16, CPU
    ego_from_agent: torch.Tensor  # [A, 4, 4] float32
    gt_boxes: np.ndarray  # [M, 7] ego frame


@torch.no_grad()
def cache_features(detector: BevDetector, samples: Sequence[CoopSample],
                   on_sample: Callable[[], None] | None = None) -> list[FeatureSample]:
    """Run the frozen pillars + backbone (or, for camera agents, image backbone and lifting) once per agent-frame."""
    cached = []
    for sample in samples:
        features = agent_features(detector, sample)
        cached.append(FeatureSample(features.half().cpu(), torch.as_tensor(sample.ego_from_agent, dtype=torch.float32),
                                    sample.gt_boxes))
        if on_sample is not None:
            on_sample()
    return cached


def step_loss(detector: BevDetector, codec: FeatureCodec, sample: FeatureSample, level: int, rate_weight: float,
              feature_weight: float) -> dict[str, torch.Tensor]:
    device = next(codec.parameters()).device
    features = sample.features.to(device).float()
    decoded, bits = codec(features, level)
    fused = detector.fuse(decoded, sample.ego_from_agent.to(device))
    targets = build_targets([sample.gt_boxes], [np.zeros(len(sample.gt_boxes), np.int64)], detector.grid,
                            detector.stride, detector.config.num_classes)
    detection = compute_loss(detector(fused, fused=True), targets.to(device))["total"]
    kilobytes = bits.mean() / 8 / 1024
    distortion = torch.mean((decoded - features) ** 2)
    return {"detection": detection, "kilobytes": kilobytes, "distortion": distortion,
            "total": detection + rate_weight * kilobytes + feature_weight * distortion}


def train_codec(detector: BevDetector, codec: FeatureCodec, samples: Sequence[FeatureSample],
                config: CodecOptimConfig, checkpoint: Path, *, resume: bool = False,
                on_step: Callable[[int, dict[str, float]], None] | None = None) -> list[float]:
    """Train ``codec`` in place against the frozen ``detector``; checkpoints as it goes."""
    if len(config.rate_weights) != codec.config.rate_levels:
        raise ValueError(f"{len(config.rate_weights)} rate weights for {codec.config.rate_levels} rate levels")
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    detector.eval().requires_grad_(False)
    entropy = [p for name, p in codec.named_parameters() if name.startswith(("densities.", "log_gain"))]
    transforms = [p for name, p in codec.named_parameters() if not name.startswith(("densities.", "log_gain"))]
    lrs = [config.lr, config.lr * config.entropy_lr_factor]
    optimiser = torch.optim.Adam([{"params": transforms, "lr": lrs[0]}, {"params": entropy, "lr": lrs[1]}])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lrs, total_steps=config.steps, pct_start=0.05)
    start = 0
    if resume and checkpoint.exists():
        blob = torch.load(checkpoint, map_location="cpu", weights_only=True)
        _check_configs(checkpoint, blob, codec.config, detector.config)
        codec.load_state_dict(blob["state_dict"])
        optimiser.load_state_dict(blob["optimiser"])
        schedule.load_state_dict(blob["schedule"])
        start = int(blob.get("step", 0))
    rng = random.Random(config.seed + start)
    losses = []
    codec.train()
    for step in range(start, config.steps):
        sample = samples[rng.randrange(len(samples))]
        level = rng.randrange(codec.config.rate_levels)
        parts = step_loss(detector, codec, sample, level, config.rate_weights[level], config.feature_weight)
        optimiser.zero_grad(set_to_none=True)
        parts["total"].backward()
        torch.nn.utils.clip_grad_norm_(codec.parameters(), 10.0)
        optimiser.step()
        schedule.step()
        values = {k: float(v.detach()) for k, v in parts.items()} | {"level": level}
        losses.append(values["total"])
        if on_step is not None:
            on_step(step + 1, values)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            codec.update_tables()
            save_codec(checkpoint, codec, detector.config, step=step + 1, optimiser=optimiser.state_dict(),
                       schedule=schedule.state_dict())
    codec.eval()
    return losses


def save_codec(path: Path, codec: FeatureCodec, detector_config: DetectorConfig, **extra) -> None:
    """Weights and frozen probability tables, with the codec's and the detector's configs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"codec_config": codec.config.model_dump(mode="json"), "feature_channels": codec.feature_channels,
                "detector_config": detector_config.model_dump(mode="json"), "state_dict": codec.state_dict(),
                **extra}, tmp)
    tmp.replace(path)


def _check_configs(path: Path, blob: dict, codec_config: CodecConfig | None, detector_config: DetectorConfig) -> None:
    try:
        saved_detector = DetectorConfig.model_validate(blob["detector_config"])
        saved_codec = CodecConfig.model_validate(blob["codec_config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CodecError(f"{path}: not a codec checkpoint: {err}") from err
    # The codec codes the features agents share; how the fusion node merges them afterwards (a merge
    # trained later on the same frozen detector, say) does not change what it must code.
    downstream = {"merge", "nms_iou_threshold"}
    if saved_detector.model_dump(exclude=downstream) != detector_config.model_dump(exclude=downstream):
        diff = [f"{k}: detector has {v!r}, codec was trained on {getattr(saved_detector, k)!r}"
                for k, v in detector_config if k not in downstream and v != getattr(saved_detector, k)]
        raise CodecError(f"{path}: codec was trained for another detector: " + "; ".join(diff))
    if codec_config is not None and saved_codec != codec_config:
        diff = [f"{k}: wanted {v!r}, checkpoint has {getattr(saved_codec, k)!r}"
                for k, v in codec_config if v != getattr(saved_codec, k)]
        raise CodecError(f"{path}: codec checkpoint has another config: " + "; ".join(diff))


def load_codec(path: Path, detector_config: DetectorConfig,
               map_location: str | torch.device = "cpu") -> tuple[FeatureCodec, dict]:
    """The codec saved at ``path``, checked against the detector it will decode for.

    Raises:
        CodecError: unreadable file, or a codec trained for another detector (both named).
    """
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CodecError(f"{path}: cannot load codec checkpoint: {err!r}") from err
    _check_configs(path, blob, None, detector_config)
    codec = FeatureCodec(CodecConfig.model_validate(blob["codec_config"]), int(blob["feature_channels"]))
    codec.load_state_dict(blob["state_dict"])
    return codec.eval(), {k: v for k, v in blob.items() if k not in ("codec_config", "state_dict")}
