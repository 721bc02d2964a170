"""``cpstream train-codec --config FILE``: train the feature codec for a trained detector."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict

from launch.console import console, progress
from launch.train_cmd import REPO_ROOT, TrainDataConfig, build_samples
from models.codec import CodecConfig, FeatureCodec
from models.codec_train import CodecOptimConfig, cache_features, load_codec, train_codec
from models.detector import BevDetector, load_checkpoint

CHECKPOINTS = REPO_ROOT / "models" / "checkpoints"


class CodecTrainConfig(BaseModel):
    """A codec training run: which detector, which frames, the codec's shape and optimiser."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    detector_checkpoint: Path = Path("models/checkpoints/mobiledet_tiny.pt")
    data: TrainDataConfig = TrainDataConfig()
    codec: CodecConfig = CodecConfig()
    optim: CodecOptimConfig = CodecOptimConfig()
    checkpoint: Path = Path("models/checkpoints/codec_mobiledet_tiny.pt")


def _repo_path(path: Path) -> Path:
    return path if path.is_absolute() else REPO_ROOT / path


def default_codec_path(detector: BevDetector) -> Path:
    """Where the committed codec for a committed detector lives."""
    return CHECKPOINTS / f"codec_{detector.config.backbone}.pt"


def load_codec_for(detector: BevDetector, path: Path | None = None) -> FeatureCodec:
    """The codec trained for ``detector`` (default: the committed one), on the detector's device."""
    path = path or default_codec_path(detector)
    if not path.exists():
        raise FileNotFoundError(f"no codec checkpoint at {path} (run cpstream train-codec first)")
    device = next(detector.parameters()).device
    return load_codec(path, detector.config, map_location=device)[0].to(device)


def cmd_train_codec(args: argparse.Namespace) -> int:
    config = CodecTrainConfig.model_validate(yaml.safe_load(args.config.read_text()) or {})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    detector, _ = load_checkpoint(_repo_path(config.detector_checkpoint), map_location=device)
    detector.to(device).eval()
    samples = build_samples(config.data, detector.config)
    with progress() as bar:
        task = bar.add_task("detector features", total=len(samples))
        cached = cache_features(detector, samples, on_sample=lambda: bar.advance(task))
    del samples
    data_s = time.perf_counter() - start
    codec = FeatureCodec(config.codec, detector.backbone.out_channels).to(device)
    console.print(f"{len(cached)} samples in {data_s:.0f} s; training the codec for {detector.config.backbone} on "
                  f"{device} ({sum(p.numel() for p in codec.parameters()) / 1e3:.1f} k parameters)")
    recent: dict[int, list[tuple[float, float]]] = {}
    with progress() as bar:
        task = bar.add_task("training codec", total=config.optim.steps)

        def on_step(step: int, values: dict[str, float]) -> None:
            history = recent.setdefault(int(values["level"]), [])
            history.append((values["detection"], values["kilobytes"]))
            del history[:-30]
            bar.update(task, completed=step)
            if step % 100 == 0:
                summary = ", ".join(f"L{lv} {np.mean([k for _, k in h]):.2f} KB det {np.mean([d for d, _ in h]):.2f}"
                                    for lv, h in sorted(recent.items()))
                console.print(f"step {step}/{config.optim.steps} ({(time.perf_counter() - start) / 60:.1f} min): "
                              f"{summary}")

        train_codec(detector, codec, cached, config.optim, _repo_path(config.checkpoint), resume=args.resume,
                    on_step=on_step)
    console.print(f"saved {_repo_path(config.checkpoint)}; wall time {(time.perf_counter() - start) / 60:.1f} min "
                  f"(data and features {data_s:.0f} s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train-codec", help="train the information-bottleneck feature codec for a detector")
    parser.add_argument("--config", type=Path, required=True, help="codec training YAML (see launch/configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint's saved step")
    parser.set_defaults(func=cmd_train_codec)
