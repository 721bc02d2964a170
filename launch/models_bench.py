"""Timing of the detectors' per-agent inference, apart from the world (so it runs where open3d does not)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from launch.allocator import retain_freed_memory
from models.backbones import list_backbones
from models.detector import DetectorConfig, build_detector, load_checkpoint, native_bfloat16

CHECKPOINTS = Path(__file__).resolve().parent.parent / "models" / "checkpoints"
WARM_UP = 5


def time_detectors(clouds: list[np.ndarray], device: torch.device | None = None,
                   peak_window: int | None = None, peak_ratio: float | None = None) -> dict:
    """For every registered backbone: median ms to detect one agent's cloud, parameters, GFLOPs.

    Times float32 and, where the hardware has it natively, bfloat16 (what ``precision: auto`` picks).
    GFLOPs are those inference runs: the box regressions are computed at the decoded peaks only.
    Uses the committed weights where they exist (the weights do not change the cost). ``peak_window``
    and ``peak_ratio`` (default: each detector's) are the decoder's peak rule.
    """
    allocator = retain_freed_memory()  # as every cpstream process does (idempotent)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tensors = [torch.from_numpy(np.ascontiguousarray(c)).to(device) for c in clouds]
    precisions = ["float32"] + (["bfloat16"] if native_bfloat16(device) else [])
    runs = []
    for name in list_backbones():
        checkpoint = CHECKPOINTS / f"{name}.pt"
        detector = (load_checkpoint(checkpoint)[0] if checkpoint.exists()
                    else build_detector(DetectorConfig(backbone=name))).to(device).eval()
        detector.set_decoder(peak_window=peak_window, peak_ratio=peak_ratio)
        for precision in precisions:
            detector.set_precision(precision)
            times_ms = []
            with torch.no_grad():
                for k in range(len(tensors) + WARM_UP):
                    start = time.perf_counter()
                    detector.detect(detector.features([tensors[k % len(tensors)]]))
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if k >= WARM_UP:
                        times_ms.append((time.perf_counter() - start) * 1000)
                with FlopCounterMode(display=False) as counter:
                    detector.detect(detector.features([tensors[0]]))
            ordered = sorted(times_ms)
            runs.append({"backbone": name, "precision": precision, "trained": checkpoint.exists(),
                         "peak_window": detector.config.peak_window, "peak_ratio": detector.config.peak_ratio,
                         "params_m": round(sum(p.numel() for p in detector.parameters()) / 1e6, 4),
                         "gflops": round(counter.get_total_flops() / 1e9, 3),
                         "latency_ms": {"median": round(statistics.median(ordered), 2),
                                        "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 2)},
                         "agent_frames": len(times_ms)})
    return {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "allocator": allocator, "runs": runs}
