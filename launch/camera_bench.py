"""``cpstream bench camera``: pedestrians at a crossing watched by pole cameras, each camera alone and fused.

The camera detector (``models/checkpoints/camera_crossing.pt``, trained on crossings with seeds 1000..)
runs on a held-out crossing (seed 0 unless ``--seed``; ``--cameras`` poles): every camera's image is
lifted onto the plaza's ground-plane grid; each camera alone detects people from its own map, the
fused detection merges all cameras' maps (intermediate fusion, as the fusion node merges agents).
People are scored as points on the ground: MODA and MODP (Hungarian matching within 0.5 m) against
everyone on the plaza. MODA needs a decision threshold; it is chosen per mode on a *training* crossing
(the best MODA there) and only then applied to the held-out one. With a codec trained for the camera
detector, the fused run is repeated on decoded features and the bytes per frame per camera measured.

Vehicles with cameras (``mixed``; ``models/checkpoints/camera_mixed.pt``: the LiDAR detector
``mobiledet_tiny.pt`` with a camera path trained into its feature space, everything else frozen) run on
the held-out town (seed 0 unless ``--seed``, ``--agents`` agents, four cameras each): the last
``--camera-agents`` agents by id sense with their cameras instead of their LiDAR. BEV AP of the LiDAR
agents alone, of the LiDAR and camera agents fused together (intermediate), of every agent with
LiDAR (the reference), and of every agent with cameras only (vehicles with cameras only), all scored
on the same objects: vehicles in the ego's grid with a LiDAR point of some agent on them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from agents.world import SyntheticWorld, WorldConfig
from agents.world.crossing import CrossingConfig, CrossingWorld
from fusion.receive import expected_grid as grid_spec
from launch.console import console, progress
from launch.samples import camera_agent_indices, camera_sample, coop_sample, mixed_sample
from models.backbones import list_backbones
from models.camera import CameraBevEncoder
from models.cooperative import CoopSample, agent_features, merge_late
from models.detector import BevDetector, load_checkpoint
from models.geometry import transform_boxes
from models.metrics import APAccumulator, ModaAccumulator
from transport.framing import feature_frame

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CAMERA_CHECKPOINT = REPO_ROOT / "models" / "checkpoints" / "camera_crossing.pt"
DEFAULT_CAMERA_CODEC = REPO_ROOT / "models" / "checkpoints" / "codec_camera_crossing.pt"
DEFAULT_MIXED_CHECKPOINT = REPO_ROOT / "models" / "checkpoints" / "camera_mixed.pt"
MIXED_RUNS = ("lidar_only", "lidar_and_camera", "all_lidar", "cameras_only")
THRESHOLD_SEED = 1000
"""The training crossing the MODA thresholds are chosen on."""
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.1, 0.91, 0.05))
TINY_VARIANTS = ("mobiledet_tiny", "nextvit_tiny")


@torch.no_grad()
def crossing_detections(detector: BevDetector, world: CrossingWorld, codec=None, codec_level: int = 0,
                        frames: int | None = None) -> dict:
    """Per mode, per frame: detected ground points with scores ``[K, 3]`` and the people ``[M, 2]``, all in
    the ego's frame and within the plaza; per camera and frame, seconds of its image backbone and lifting."""
    device = next(detector.parameters()).device
    half = world.config.half_size_m
    out: dict = {"people": [], "modes": {}, "camera_s": [], "bytes": []}
    count = min(frames or len(world), len(world))

    def keep(boxes: np.ndarray) -> np.ndarray:
        inside = np.all(np.abs(boxes[:, :2]) <= half, axis=1)  # the plaza (the ego frame is the site's)
        return np.column_stack([boxes[inside, :2], boxes[inside, 7]])

    def add(mode: str, points: np.ndarray) -> None:
        out["modes"].setdefault(mode, []).append(points)

    with progress() as bar:
        task = bar.add_task(f"crossing seed {world.config.seed}", total=count)
        for index in range(count):
            sample = camera_sample(world.frame(index), detector.grid, detector.feature_cell_m, area_half_m=half)
            ego_from_agent = torch.as_tensor(sample.ego_from_agent, dtype=torch.float32, device=device)
            features = []
            for k in range(len(sample.points)):
                start = time.perf_counter()
                features.append(agent_features(detector, sample, [k]))
                out["camera_s"].append(time.perf_counter() - start)
            features = torch.cat(features)
            own = [d[:, :8].cpu().numpy().astype(np.float64) for d in detector.detect(features, score_threshold=0.05)]
            for k, boxes in enumerate(own):
                add(f"camera {k}", keep(transform_boxes(sample.ego_from_agent[k], boxes)))
            add("late", keep(merge_late(own, sample.ego_from_agent, detector.config.nms_iou_threshold)))
            fused = detector.detect(detector.fuse(features, ego_from_agent), fused=True, score_threshold=0.05)[0]
            add("fused", keep(fused[:, :8].cpu().numpy().astype(np.float64)))
            if codec is not None:
                decoded, valid, sizes = [], [], []
                grid = grid_spec(detector, codec)
                for k in range(len(features)):
                    frame = codec.encode(features[k:k + 1], codec_level)
                    wire = feature_frame(agent_id=k, sequence=index, capture_time_ns=index * 200_000_000,
                                         world_from_agent=sample.ego_from_agent[k], grid=grid, codec_id=codec.codec_id,
                                         rate_level=codec_level, tiles=frame.tiles,
                                         tile_count=codec.tile_count(frame.feature_shape)).SerializeToString()
                    sizes.append(len(wire))  # the message on the wire, framing included (as bench codec counts)
                    f, v, _ = codec.decode(frame, device)
                    decoded.append(f)
                    valid.append(v)
                out["bytes"].extend(sizes)
                merged = detector.fuse(torch.cat(decoded), ego_from_agent, torch.cat(valid))
                add("fused_codec", keep(detector.detect(merged, fused=True, score_threshold=0.05)[0][:, :8]
                                         .cpu().numpy().astype(np.float64)))
            out["people"].append(sample.gt_boxes[:, :2])
            bar.advance(task)
    return out


def moda_at(points: list[np.ndarray], people: list[np.ndarray], threshold: float) -> dict:
    moda = ModaAccumulator()
    for found, truth in zip(points, people, strict=True):
        moda.add_frame(found[found[:, 2] >= threshold, :2], truth)
    return moda.result()


def best_threshold(points: list[np.ndarray], people: list[np.ndarray]) -> float:
    """The decision threshold with the best MODA on these frames (ties: the lower one)."""
    return max(THRESHOLDS, key=lambda t: (moda_at(points, people, t)["moda"], -t))


def image_backbone_ms(height_px: int, width_px: int, channels: int, reduction: int, repeats: int = 15) -> dict:
    """Median milliseconds of one camera's image backbone and neck per tiny variant (weights do not change the time)."""
    result = {}
    image = torch.randint(0, 256, (1, height_px, width_px, 3), dtype=torch.uint8)
    for name in TINY_VARIANTS:
        if name not in list_backbones():
            continue
        encoder = CameraBevEncoder(name, channels, reduction).eval()
        times = []
        with torch.no_grad():
            for k in range(repeats + 3):
                start = time.perf_counter()
                encoder.image_features(image)
                if k >= 3:  # the first runs warm caches and the allocator
                    times.append((time.perf_counter() - start) * 1e3)
        result[name] = round(statistics.median(times), 1)
    return result


@torch.no_grad()
def _fused_boxes(detector: BevDetector, sample: CoopSample, agents: list[int]) -> np.ndarray:
    """Intermediate fusion of ``agents`` (index 0, the ego, first) of ``sample``: ``[K, 8]`` in the ego frame."""
    device = next(detector.parameters()).device
    features = agent_features(detector, sample, agents)
    ego_from_agent = torch.as_tensor(sample.ego_from_agent[agents], dtype=torch.float32, device=device)
    merged = detector.fuse(features, ego_from_agent)
    return detector.detect(merged, fused=True, score_threshold=0.05)[0][:, :8].cpu().numpy().astype(np.float64)


def mixed_bench(detector: BevDetector, world: SyntheticWorld, camera_agents: int) -> dict:
    """AP@0.3/0.5/0.7 of the runs in :data:`MIXED_RUNS` over the world's frames, and the camera agents' ids."""
    grid, lattice = detector.grid, detector.feature_cell_m
    scores = {name: APAccumulator() for name in MIXED_RUNS}
    camera_ids: list[int] = []
    order: list[int] = []
    with progress() as bar:
        task = bar.add_task(f"{world.scenario}: LiDAR and camera agents", total=len(world))
        for frame in world:
            full = coop_sample(frame, grid, lattice)
            count = len(full.points)
            mixed = mixed_sample(frame, grid, lattice, camera_agents)
            cameras = camera_agent_indices(count, camera_agents)
            lidar = [k for k in range(count) if k not in cameras]
            order = [frame.ego_id] + [a for a in sorted(frame.agents) if a != frame.ego_id]
            camera_ids = [order[k] for k in cameras]
            scores["all_lidar"].add_frame(_fused_boxes(detector, full, list(range(count))), full.gt_boxes)
            scores["lidar_only"].add_frame(_fused_boxes(detector, mixed, lidar), full.gt_boxes)
            scores["lidar_and_camera"].add_frame(_fused_boxes(detector, mixed, list(range(count))), full.gt_boxes)
            only_cameras = mixed_sample(frame, grid, lattice, count)
            scores["cameras_only"].add_frame(_fused_boxes(detector, only_cameras, list(range(count))), full.gt_boxes)
            bar.advance(task)
    ap = {name: {k: round(v, 4) for k, v in acc.result().items()} for name, acc in scores.items()}
    return {"ap": ap, "camera_agents": camera_ids, "agents": order, "frames": len(world)}


def bench_camera(args: argparse.Namespace) -> dict:
    checkpoint = Path(args.checkpoint) if args.checkpoint else DEFAULT_CAMERA_CHECKPOINT
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    detector = load_checkpoint(checkpoint, map_location=device)[0].to(device).eval()
    if detector.camera is None:
        raise SystemExit(f"{checkpoint} has no camera path (camera_backbone is not set)")
    codec_path = Path(args.codec) if args.codec else DEFAULT_CAMERA_CODEC
    codec = None
    if codec_path.exists():
        from models.codec_train import load_codec
        codec = load_codec(codec_path, detector.config, map_location=device)[0].to(device).eval()
    else:
        console.print(f"no codec at {codec_path}: bytes are not measured")
    cameras = args.cameras or 5
    frames = args.frames or 40
    base = CrossingConfig(cameras=cameras, frames=frames)
    tuning = crossing_detections(detector, CrossingWorld(base.model_copy(update={"seed": THRESHOLD_SEED})),
                                 frames=min(frames, 20))
    thresholds = {m: best_threshold(p, tuning["people"]) for m, p in tuning["modes"].items()}
    seed = args.seed if args.seed is not None else 0
    held_out = crossing_detections(detector, CrossingWorld(base.model_copy(update={"seed": seed})), codec,
                                   args.rate_level)
    scored = {m: moda_at(p, held_out["people"], thresholds.get(m, thresholds["fused"]))
              for m, p in held_out["modes"].items()}
    singles = {m: r for m, r in scored.items() if m.startswith("camera ")}
    best = max(singles, key=lambda m: singles[m]["moda"])
    config = detector.config
    sample_image = CrossingWorld(base.model_copy(update={"frames": 1})).frame(0).agents[-1].cameras[0].image_rgb
    result = {
        "checkpoint": checkpoint.name, "seed": seed, "cameras": cameras, "frames": len(held_out["people"]),
        "people_per_frame": round(float(np.mean([len(p) for p in held_out["people"]])), 1),
        "moda": {"best_single": scored[best]["moda"], "fused": scored["fused"]["moda"], "late": scored["late"]["moda"],
                 **({"fused_codec": scored["fused_codec"]["moda"]} if "fused_codec" in scored else {}),
                 "per_camera": {m: r["moda"] for m, r in singles.items()}},
        "modp": {"best_single": scored[best]["modp"], "fused": scored["fused"]["modp"], "late": scored["late"]["modp"]},
        "precision_recall": {m: {"precision": r["precision"], "recall": r["recall"]} for m, r in scored.items()},
        "best_single_camera": best,
        "thresholds": thresholds,
        "bytes_per_frame": statistics.median(held_out["bytes"]) if held_out["bytes"] else None,
        "codec": codec_path.name if codec is not None else None, "codec_level": args.rate_level if codec else None,
        "feature_map": [config.feature_channels, detector.feature_grid.height_cells, detector.feature_grid.width_cells],
        "camera_inference_ms": {"checkpoint": round(statistics.median(held_out["camera_s"]) * 1e3, 1),
                                "image_backbone": image_backbone_ms(*sample_image.shape[:2], config.feature_channels,
                                                                    config.camera_reduction)},
        "image_px": list(sample_image.shape[:2]),
    }
    if DEFAULT_MIXED_CHECKPOINT.exists() and args.camera_agents:
        mixed_detector = load_checkpoint(DEFAULT_MIXED_CHECKPOINT, map_location=device)[0].to(device).eval()
        world = SyntheticWorld(WorldConfig(seed=seed, agents=args.agents or 4, frames=args.frames or 40,
                                           camera={"count": 4}))
        result["mixed"] = {"checkpoint": DEFAULT_MIXED_CHECKPOINT.name, "seed": seed,
                           **mixed_bench(mixed_detector, world, args.camera_agents)}
    else:
        console.print(f"no {DEFAULT_MIXED_CHECKPOINT.name} (or --camera-agents 0): the mixed LiDAR and camera "
                      "setting is not run")
    return result
