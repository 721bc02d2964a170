"""``cpstream eval``: score a fusion mode on a held-out world (or an OPV2V folder)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from launch.console import console, progress, write_json
from launch.datasets import HELD_OUT_SEED, scene_frames
from launch.samples import coop_sample
from launch.world_cmd import add_world_options, unit_interval, world_config
from models.cooperative import FUSION_MODES, CoopSample, detect_sample
from models.detector import BevDetector, load_checkpoint
from models.metrics import APAccumulator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = REPO_ROOT / "models" / "checkpoints" / "mobiledet_tiny.pt"
BOX_BYTES = 9 * 4
"""An object on the wire: 7 box values, score and class as 32-bit numbers."""


def bytes_per_agent(detector: BevDetector, sample: CoopSample, dets_per_agent: list[int], mode: str) -> float:
    """Mean payload bytes one non-ego agent sends per frame in ``mode`` (before any compression)."""
    others = len(sample.points) - 1
    if mode == "none" or others == 0:
        return 0.0
    if mode == "late":
        return float(np.mean(dets_per_agent[1:])) * BOX_BYTES
    if mode == "early":
        return float(np.mean([p.nbytes for p in sample.points[1:]]))
    grid = detector.grid
    cells = (grid.height_cells // detector.stride) * (grid.width_cells // detector.stride)
    return float(cells * detector.backbone.out_channels * 4)


def _per_agent_counts(detector: BevDetector, sample: CoopSample) -> list[int]:
    device = next(detector.parameters()).device
    with torch.no_grad():
        features = detector.features([torch.from_numpy(p).to(device) for p in sample.points])
        return [len(d) for d in detector.detect(features)]


def held_out_samples(args: argparse.Namespace, grid, lattice_m: float) -> list[tuple[str, int, CoopSample]]:
    """(scenario, frame, sample) for every frame of ``--data`` or of the held-out synthetic world.

    ``lattice_m`` is the detector's feature cell, on which agents' BEV frames are placed.
    """
    world = None
    if args.data is None:
        if args.seed is None:
            args.seed = HELD_OUT_SEED
        config = world_config(args)  # cameras are not used by the LiDAR detector: skip rendering them
        world = config.model_copy(update={"camera": config.camera.model_copy(update={"count": 0})})
    total, frames = scene_frames(args.data, world)
    samples = []
    with progress() as bar:
        task = bar.add_task("reading frames", total=total)
        for frame in frames:
            samples.append((frame.scenario, frame.frame_index, coop_sample(frame, grid, lattice_m)))
            bar.advance(task)
    return samples


def evaluate(detector: BevDetector, samples: list[tuple[str, int, CoopSample]], mode: str,
             dump: Path | None = None) -> dict:
    """AP of ``mode`` over ``samples``; detections outside the grid are dropped like the ground truth."""
    ap = APAccumulator()
    sent: list[float] = []
    wall_ms: list[float] = []  # one frame's detection in this mode, every agent's share on this machine
    dump_file = dump.open("w") if dump is not None else None
    try:
        with progress() as bar:
            task = bar.add_task(f"eval {detector.config.backbone} {mode}", total=len(samples))
            for scenario, frame_index, sample in samples:
                start = time.perf_counter()
                det = detect_sample(detector, sample, mode)
                wall_ms.append((time.perf_counter() - start) * 1000)
                det = det[detector.grid.contains(det[:, :2])] if len(det) else det
                ap.add_frame(det, sample.gt_boxes)
                counts = _per_agent_counts(detector, sample) if mode == "late" else []
                sent.append(bytes_per_agent(detector, sample, counts, mode))
                if dump_file is not None:
                    dump_file.write(json.dumps({"frame": frame_index, "scenario": scenario,
                                                "gt": np.round(sample.gt_boxes, 4).tolist(),
                                                "det": np.round(det, 4).tolist()}) + "\n")
                bar.advance(task)
    finally:
        if dump_file is not None:
            dump_file.close()
    result = ap.result()
    return {"fusion": mode, "ap": {k: (None if np.isnan(v) else round(v, 4)) for k, v in result.items()},
            "frames": ap.frames, "gt_objects": ap.gt_count, "bytes_per_frame": round(float(np.mean(sent)), 1),
            "ms_per_frame": round(float(np.median(wall_ms)), 1) if wall_ms else None}


def cmd_eval(args: argparse.Namespace) -> int:
    if args.rate_level is not None and args.fusion != "intermediate":
        raise ValueError(f"--rate-level codes the shared features: it needs --fusion intermediate, not {args.fusion}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    detector, _ = load_checkpoint(args.checkpoint, map_location=device)
    detector.to(device).eval()
    detector.set_decoder(peak_window=args.peak_window, peak_ratio=args.peak_ratio)
    precision = detector.set_precision(args.precision)
    codec = None
    if args.rate_level is not None:
        from launch.codec_cmd import load_codec_for

        codec = load_codec_for(detector, args.codec)
        if not 0 <= args.rate_level < codec.config.rate_levels:
            raise ValueError(f"--rate-level {args.rate_level}: the codec has levels 0..{codec.config.rate_levels - 1}")
    samples = held_out_samples(args, detector.grid, detector.feature_cell_m)
    result = {"checkpoint": str(args.checkpoint), "backbone": detector.config.backbone,
              "data": str(args.data) if args.data else f"synthetic seed {args.seed}", "precision": precision,
              "decoder": {"peak_window": detector.config.peak_window, "peak_ratio": detector.config.peak_ratio}}
    if codec is None:
        result.update(evaluate(detector, samples, args.fusion, args.dump))
    else:
        from launch.codec_bench import codec_scheme, grid_spec, prepare, score_scheme

        scored = score_scheme(detector, prepare(detector, samples),
                              codec_scheme(codec, args.rate_level, grid_spec(detector, codec)),
                              f"eval intermediate, codec level {args.rate_level}", args.dump)
        result.update({"fusion": "intermediate", "rate_level": args.rate_level, "codec_id": codec.codec_id,
                       "frames": len(samples), **scored})
    console.print_json(json.dumps(result))
    write_json(args.json, result)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="BEV AP of one fusion mode on a held-out world or an OPV2V folder")
    parser.add_argument("--data", type=Path, help="OPV2V-layout folder (default: the synthetic held-out world)")
    parser.add_argument("--fusion", choices=FUSION_MODES, default="intermediate", help="fusion mode")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="detector weights")
    parser.add_argument("--json", type=Path, help="write {ap, frames, bytes_per_frame, ...} here")
    parser.add_argument("--dump", type=Path, help="write what was scored, one JSON object per frame")
    parser.add_argument("--rate-level", type=int,
                        help="send the features through the codec at this level (intermediate fusion)")
    parser.add_argument("--codec", type=Path, help="codec weights (default: the one trained for the detector)")
    parser.add_argument("--precision", choices=("float32", "bfloat16", "auto"), default="float32",
                        help="arithmetic of the backbone and head (auto: bfloat16 where the hardware has it)")
    parser.add_argument("--peak-window", type=int, choices=(1, 3, 5),
                        help="decoding: the heat-map peak rule's window (default: the checkpoint's, 3)")
    parser.add_argument("--peak-ratio", type=unit_interval,
                        help="decoding: a cell is a candidate at this share of its window's maximum or more "
                             "(1: local maxima only; default: the checkpoint's, 0.5)")
    add_world_options(parser)
    parser.set_defaults(func=cmd_eval)
