"""``cpstream bench codec``: AP against bytes on the wire for the learned codec and its baselines.

Every agent (the ego too: in the streaming system every agent sends to the
fusion node) turns its features into a ``cp.v1.FeatureFrame`` exactly as it
would send it: tiles, pose, grid spec, codec id and rate level. The bytes
counted are the serialized message (framing included). The agent's object list
travels in the same message in the live system; here it is counted once, as
the late-fusion baseline, so that the feature schemes are compared on features.
The receiver parses the bytes back and decodes what it got; the decoded
features of all agents are warped, merged and detected, and scored on the
held-out world.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import zlib
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zstandard

from fusion.receive import expected_grid as grid_spec
from launch.console import console, progress
from models.codec import CodedFrame, CodedTile, FeatureCodec, select_tiles
from models.cooperative import CoopSample, merge_late
from models.detector import BevDetector
from models.metrics import APAccumulator
from protos import FeatureFrame
from transport.framing import RAW_CODEC_ID, GridSpec, boxes_to_proto, feature_frame


@dataclass(frozen=True, slots=True)
class AgentView:
    """What one agent has before sending: its features, where it expects objects, its own boxes."""

    features: torch.Tensor  # [1, C, h, w]
    relevance: torch.Tensor  # [h, w]
    detections: np.ndarray  # [K, 9] own frame


@dataclass(frozen=True, slots=True)
class Prepared:
    scenario: str
    frame: int
    sample: CoopSample
    agents: list[AgentView]


@dataclass(slots=True)
class Sent:
    """What a scheme delivered for one agent-frame."""

    wire_bytes: int
    features: torch.Tensor  # [1, C, h, w] as decoded
    valid: torch.Tensor | None = None  # [1, 1, h, w], None: all cells
    encode_s: float = 0.0
    decode_s: float = 0.0


Scheme = Callable[[AgentView, int, CoopSample, int], Sent]
"""(agent view, agent index, sample, frame number) -> what the receiver decoded."""


@torch.no_grad()
def prepare(detector: BevDetector, samples: list[tuple[str, int, CoopSample]]) -> list[Prepared]:
    device = next(detector.parameters()).device
    prepared = []
    with progress() as bar:
        task = bar.add_task("agents' features and boxes", total=len(samples))
        for scenario, index, sample in samples:
            features = detector.features([torch.from_numpy(p).to(device) for p in sample.points])
            out = detector.infer(features)
            dets = detector.decode(out)
            relevance = detector.relevance(out)
            agents = [AgentView(features[k:k + 1], relevance[k], dets[k].cpu().numpy().astype(np.float64))
                      for k in range(len(sample.points))]
            prepared.append(Prepared(scenario, index, sample, agents))
            bar.advance(task)
    return prepared


def _wire(sample: CoopSample, k: int, frame_no: int, grid: GridSpec, codec_id: str, level: int,
          tiles: list, tile_count: int) -> bytes:
    message = feature_frame(agent_id=k, sequence=frame_no, capture_time_ns=frame_no * 100_000_000,
                            world_from_agent=sample.ego_from_agent[k], grid=grid, codec_id=codec_id,
                            rate_level=level, tiles=tiles, tile_count=tile_count)
    return message.SerializeToString()


def codec_scheme(codec: FeatureCodec, level: int, grid: GridSpec, max_bytes: int | None = None) -> Scheme:
    """The learned codec at ``level`` (optionally cut to a tile budget by relevance)."""
    def send(view: AgentView, k: int, sample: CoopSample, frame_no: int) -> Sent:
        start = time.perf_counter()
        coded = select_tiles(codec.encode(view.features, level, relevance=view.relevance), max_bytes)
        encoded = time.perf_counter()
        wire = _wire(sample, k, frame_no, grid, codec.codec_id, level, list(coded.tiles),
                     codec.tile_count(coded.feature_shape))
        received = FeatureFrame.FromString(wire)
        tiles = tuple(CodedTile(t.index, t.payload, t.crc32, t.relevance) for t in received.tiles)
        start_decode = time.perf_counter()
        features, valid, _ = codec.decode(CodedFrame(received.rate_level, coded.feature_shape, tiles),
                                          device=view.features.device)
        decoded = time.perf_counter()
        return Sent(len(wire), features, valid, encoded - start, decoded - start_decode)
    return send


def raw_scheme(grid: GridSpec, dtype: str) -> Scheme:
    """Uncoded features as fp32 or fp16 (one tile)."""
    def send(view: AgentView, k: int, sample: CoopSample, frame_no: int) -> Sent:
        array = view.features[0].cpu().numpy().astype(np.float16 if dtype == "fp16" else np.float32)
        payload = array.tobytes()
        wire = _wire(sample, k, frame_no, grid, RAW_CODEC_ID, 0, [CodedTile(0, payload, zlib.crc32(payload))], 1)
        features = torch.from_numpy(array.astype(np.float32))[None].to(view.features.device)
        return Sent(len(wire), features)
    return send


def int8_zstd_scheme(grid: GridSpec) -> Scheme:
    """Per-channel int8 quantisation (scale = channel max) + zstd level 3."""
    compressor, decompressor = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()

    def send(view: AgentView, k: int, sample: CoopSample, frame_no: int) -> Sent:
        start = time.perf_counter()
        array = view.features[0].cpu().numpy()  # [C, h, w], >= 0 after the neck's activation
        scale = np.maximum(array.reshape(len(array), -1).max(axis=1), 1e-12).astype(np.float32) / 127.0
        quantised = np.clip(np.round(array / scale[:, None, None]), -127, 127).astype(np.int8)
        payload = scale.tobytes() + compressor.compress(quantised.tobytes())
        encoded = time.perf_counter()
        wire = _wire(sample, k, frame_no, grid, "int8-zstd", 0, [CodedTile(0, payload, zlib.crc32(payload))], 1)
        scales = np.frombuffer(payload[:4 * len(array)], np.float32)
        restored = np.frombuffer(decompressor.decompress(payload[4 * len(array):]), np.int8).reshape(array.shape)
        features = torch.from_numpy(restored.astype(np.float32) * scales[:, None, None])[None]
        return Sent(len(wire), features.to(view.features.device), None, encoded - start,
                    time.perf_counter() - encoded)
    return send


def topk_scheme(grid: GridSpec, budget_bytes: int) -> Scheme:
    """Where2comm-style: only the cells the agent's own head finds most relevant, as fp16, within a budget."""
    def send(view: AgentView, k: int, sample: CoopSample, frame_no: int) -> Sent:
        channels, h, w = view.features.shape[1:]
        cell_bytes = 2 + 2 * channels
        overhead = len(_wire(sample, k, frame_no, grid, "topk-fp16", 0, [CodedTile(0, b"", 0)], 1))
        keep = max(0, min(h * w, (budget_bytes - overhead) // cell_bytes))
        order = torch.argsort(view.relevance.flatten(), descending=True)[:keep].sort().values
        values = view.features[0].flatten(1)[:, order].T.cpu().numpy().astype(np.float16)  # [k, C]
        payload = order.cpu().numpy().astype(np.uint16).tobytes() + values.tobytes()
        wire = _wire(sample, k, frame_no, grid, "topk-fp16", 0, [CodedTile(0, payload, zlib.crc32(payload))], 1)
        features = torch.zeros(channels, h * w)
        valid = torch.zeros(h * w)
        features[:, order.cpu()] = torch.from_numpy(values.astype(np.float32)).T
        valid[order.cpu()] = 1.0
        device = view.features.device
        return Sent(len(wire), features.view(1, channels, h, w).to(device), valid.view(1, 1, h, w).to(device))
    return send


@torch.no_grad()
def score_scheme(detector: BevDetector, prepared: list[Prepared], scheme: Scheme, label: str,
                 dump: Path | None = None) -> dict:
    """Intermediate fusion of what ``scheme`` delivered: AP, bytes per agent-frame, codec times.

    ``dump`` writes what was scored per frame, as ``cpstream eval --dump`` does.
    """
    ap = APAccumulator()
    wire, encode_ms, decode_ms = [], [], []
    with progress() as bar, (dump.open("w") if dump is not None else nullcontext()) as dump_file:
        task = bar.add_task(label, total=len(prepared))
        for p in prepared:
            sent = [scheme(view, k, p.sample, p.frame) for k, view in enumerate(p.agents)]
            wire.extend(s.wire_bytes for s in sent)
            encode_ms.extend(s.encode_s * 1000 for s in sent)
            decode_ms.extend(s.decode_s * 1000 for s in sent)
            features = torch.cat([s.features for s in sent])
            valid = None
            if any(s.valid is not None for s in sent):
                valid = torch.cat([s.valid if s.valid is not None else torch.ones_like(s.features[:, :1])
                                   for s in sent])
            ego_from_agent = torch.as_tensor(p.sample.ego_from_agent, dtype=torch.float32, device=features.device)
            det = detector.detect(detector.fuse(features, ego_from_agent, valid), fused=True)[0][:, :8].cpu().numpy()
            det = det[detector.grid.contains(det[:, :2])] if len(det) else det
            ap.add_frame(det.astype(np.float64), p.sample.gt_boxes)
            if dump_file is not None:
                dump_file.write(json.dumps({"frame": p.frame, "scenario": p.scenario,
                                            "gt": np.round(p.sample.gt_boxes, 4).tolist(),
                                            "det": np.round(det.astype(np.float64), 4).tolist()}) + "\n")
            bar.advance(task)
    return {"bytes_per_frame": round(statistics.mean(wire), 1), "ap": _ap(ap), "gt_objects": ap.gt_count,
            "encode_ms": round(statistics.median(encode_ms), 2), "decode_ms": round(statistics.median(decode_ms), 2)}


def score_late(detector: BevDetector, prepared: list[Prepared]) -> dict:
    """Late fusion: each agent's own boxes; bytes = its object list as ``Box3D`` messages."""
    ap = APAccumulator()
    sizes = []
    for p in prepared:
        per_agent = [a.detections for a in p.agents]
        sizes.extend(len(FeatureFrame(detections=boxes_to_proto(d)).SerializeToString()) for d in per_agent)
        det = merge_late([d[:, :8] for d in per_agent], p.sample.ego_from_agent, detector.config.nms_iou_threshold)
        det = det[detector.grid.contains(det[:, :2])] if len(det) else det
        ap.add_frame(det, p.sample.gt_boxes)
    return {"bytes_per_frame": round(statistics.mean(sizes), 1), "ap": _ap(ap)}


def _ap(acc: APAccumulator) -> dict:
    return {k: (None if np.isnan(v) else round(v, 4)) for k, v in acc.result().items()}


def run_codec_bench(detector: BevDetector, codec: FeatureCodec, samples: list[tuple[str, int, CoopSample]],
                    topk_budgets: bool = True) -> dict:
    prepared = prepare(detector, samples)
    grid = grid_spec(detector, codec)
    channels, h, w = prepared[0].agents[0].features.shape[1:]

    def run(send: Scheme, label: str) -> dict:
        return score_scheme(detector, prepared, send, label)

    result: dict = {"raw_fp32_bytes_per_frame": channels * h * w * 4, "frames": len(prepared),
                    "agent_frames": sum(len(p.agents) for p in prepared), "codec_id": codec.codec_id}
    uncompressed = run(raw_scheme(grid, "fp32"), "uncompressed fp32")
    result["uncompressed"] = uncompressed
    result["late"] = score_late(detector, prepared)
    levels = []
    for level in range(codec.config.rate_levels):
        scored = run(codec_scheme(codec, level, grid), f"codec level {level}")
        levels.append({"level": level, **scored})
        console.print(f"level {level}: {scored['bytes_per_frame']:.0f} B/frame/agent, AP {scored['ap']}, "
                      f"encode {scored['encode_ms']} ms, decode {scored['decode_ms']} ms")
    result["levels"] = levels
    baselines = {"raw_fp16": [run(raw_scheme(grid, "fp16"), "fp16")],
                 "int8_zstd": [run(int8_zstd_scheme(grid), "int8 + zstd")]}
    if topk_budgets:
        baselines["topk_fp16"] = [{"budget_bytes": int(lv["bytes_per_frame"]),
                                   **run(topk_scheme(grid, int(lv["bytes_per_frame"])), f"top-k at {lv['level']}")}
                                  for lv in levels]
    result["baselines"] = baselines
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for ax, iou in zip(axes, ("0.5", "0.7")):
        levels = result["levels"]
        ax.plot([lv["bytes_per_frame"] for lv in levels], [lv["ap"][iou] for lv in levels], "o-",
                label="learned codec (rate levels)", color="tab:blue")
        for lv in levels:
            ax.annotate(str(lv["level"]), (lv["bytes_per_frame"], lv["ap"][iou]), textcoords="offset points",
                        xytext=(4, -10), fontsize=8)
        styles = {"topk_fp16": ("s--", "tab:orange", "top-k cells, fp16 (Where2comm-style)"),
                  "raw_fp16": ("^", "tab:green", "raw fp16"), "int8_zstd": ("D", "tab:purple", "int8 + zstd")}
        for name, runs in result["baselines"].items():
            marker, color, label = styles.get(name, ("x", "grey", name))
            ax.plot([r["bytes_per_frame"] for r in runs], [r["ap"][iou] for r in runs], marker, color=color,
                    label=label)
        late = result["late"]
        ax.plot([late["bytes_per_frame"]], [late["ap"][iou]], "*", color="tab:red", markersize=12,
                label="late fusion (object list)")
        unc = result["uncompressed"]
        ax.plot([unc["bytes_per_frame"]], [unc["ap"][iou]], "P", color="black", label="uncompressed fp32")
        ax.axhline(unc["ap"][iou], color="black", linewidth=0.5, linestyle=":")
        ax.axvline(result["raw_fp32_bytes_per_frame"] / 100, color="grey", linewidth=0.5, linestyle="--")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per frame per agent on the wire")
        ax.set_ylabel(f"intermediate-fusion AP@{iou}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Feature codec on the held-out world ({result['frames']} frames); dashed line: 1/100 of raw fp32")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_codec(args: argparse.Namespace) -> dict:
    from launch.codec_cmd import load_codec_for
    from launch.eval_cmd import DEFAULT_CHECKPOINT, held_out_samples
    from models.detector import load_checkpoint

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    detector = load_checkpoint(args.checkpoint or DEFAULT_CHECKPOINT, map_location=device)[0].to(device).eval()
    codec = load_codec_for(detector, args.codec)
    samples = held_out_samples(args, detector.grid, detector.feature_cell_m)
    result = {"backbone": detector.config.backbone,
              "data": str(args.data) if args.data else f"synthetic seed {args.seed}",
              **run_codec_bench(detector, codec, samples)}
    if args.plot is not None:
        plot(result, args.plot)
        console.print(f"wrote {args.plot}")
    return result
