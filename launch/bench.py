"""``cpstream bench NAME``: benchmarks that print and save medians."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from agents import SceneFrame, SyntheticWorld, write_scene_frame
from launch.console import console, progress, write_json
from launch.world_cmd import add_world_options, unit_interval, world_config


def machine() -> dict:
    """What the figures were measured on."""
    import torch  # imported late: most commands never need it

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def bench_world(args: argparse.Namespace) -> dict:
    """Seconds per agent-frame to ray cast the LiDAR and render the cameras, and to write them."""
    config = world_config(args)
    world = SyntheticWorld(config)
    render_s, write_s = [], []
    with tempfile.TemporaryDirectory() as tmp, progress() as bar:
        task = bar.add_task("world frames", total=len(world) * len(world.agent_ids))
        for index in range(len(world)):
            for agent_id in world.agent_ids:
                start = time.perf_counter()
                agent = world.agent_frame(index, agent_id)
                rendered = time.perf_counter()
                write_scene_frame(Path(tmp), SceneFrame(world.scenario, index, index / config.rate_hz,
                                                        {agent_id: agent}))
                render_s.append(rendered - start)
                write_s.append(time.perf_counter() - rendered)
                bar.advance(task)
    total = [r + w for r, w in zip(render_s, write_s)]
    return {"agent_frames": len(render_s), "cameras": config.camera.count, "lidar_rays": config.lidar.beams *
            config.lidar.azimuth_steps, "render_s": _summary(render_s), "write_s": _summary(write_s),
            "total_s": _summary(total)}


def _summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median": round(statistics.median(ordered), 4), "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 4),
            "min": round(ordered[0], 4)}


def _frame_clouds(args: argparse.Namespace) -> list:
    """Per-agent point clouds (ground frame) from the held-out world."""
    from launch.datasets import HELD_OUT_SEED
    from launch.samples import ground_points

    config = world_config(args)
    if args.seed is None:
        config = config.model_copy(update={"seed": HELD_OUT_SEED})
    config = config.model_copy(update={"camera": config.camera.model_copy(update={"count": 0})})
    world = SyntheticWorld(config)
    clouds = []
    with progress() as bar:
        task = bar.add_task("world frames", total=len(world))
        for index in range(len(world)):
            clouds.extend(ground_points(a) for a in world.frame(index).agents.values())
            bar.advance(task)
    return clouds


def bench_models(args: argparse.Namespace) -> dict:
    """Per-agent inference time (pillars + backbone + refine + head + decode) per registered backbone."""
    from launch.models_bench import time_detectors

    return time_detectors(_frame_clouds(args), peak_window=args.peak_window, peak_ratio=args.peak_ratio)


def bench_fusion(args: argparse.Namespace) -> dict:
    """AP of every fusion mode for every trained detector checkpoint, on the same held-out frames."""
    from launch.eval_cmd import REPO_ROOT, evaluate, held_out_samples
    from models.cooperative import FUSION_MODES
    from models.detector import load_checkpoint

    checkpoints = sorted(p for p in (REPO_ROOT / "models" / "checkpoints").glob("*.pt")
                         if not p.name.startswith("codec_"))  # codecs sit beside their detectors
    if not checkpoints:
        raise FileNotFoundError("no trained detectors in models/checkpoints (run cpstream train first)")
    samples, runs = {}, []
    for path in checkpoints:
        detector = load_checkpoint(path)[0].eval()
        key = (detector.grid, detector.feature_cell_m)  # the same frames, in this detector's BEV frames
        if key not in samples:
            samples[key] = held_out_samples(args, detector.grid, detector.feature_cell_m)
        for mode in FUSION_MODES:
            runs.append({"checkpoint": path.name, "backbone": detector.config.backbone,
                         "merge": detector.config.merge, **evaluate(detector, samples[key], mode)})
            console.print(f"{path.stem:>22} ({detector.config.merge} merge) {mode:>12}: AP {runs[-1]['ap']}")
    return {"data": str(args.data) if args.data else f"synthetic seed {args.seed}", "runs": runs}


def bench_codec(args: argparse.Namespace) -> dict:
    """Bytes on the wire against intermediate-fusion AP: codec rate levels, baselines, late fusion."""
    from launch.codec_bench import bench_codec as run

    return run(args)


def bench_scale(args: argparse.Namespace) -> dict:
    """Fusion tick time and achieved rate with 2, 4, 8, 16 agents streaming into a fusion process."""
    from launch.scale_bench import bench_scale as run

    return run(args)


def bench_pose(args: argparse.Namespace) -> dict:
    """Intermediate and late fusion AP under pose noise, with and without online pose correction."""
    from launch.pose_bench import bench_pose as run

    return run(args)


def bench_loss(args: argparse.Namespace) -> dict:
    """Intermediate-fusion AP and latency under real packet loss (and bandwidth caps), per transport mode."""
    from launch.loss_bench import bench_loss as run

    return run(args)


def bench_chat(args: argparse.Namespace) -> dict:
    """The video chat: what the model reads under real UDP loss; bitrate saved by context-aware encoding."""
    from launch.chat_loss_bench import bench_chat as run

    return run(args)


def bench_camera(args: argparse.Namespace) -> dict:
    """MODA / MODP of pedestrians at a pole-camera crossing: the best single camera against all fused."""
    from launch.camera_bench import bench_camera as run

    return run(args)


BENCHES = {"world": bench_world, "models": bench_models, "fusion": bench_fusion, "codec": bench_codec,
           "scale": bench_scale, "loss": bench_loss, "pose": bench_pose, "camera": bench_camera, "chat": bench_chat}


def cmd_bench(args: argparse.Namespace) -> int:
    result = {"bench": args.name, "machine": machine(), **BENCHES[args.name](args)}
    console.print_json(json.dumps(result))
    write_json(args.json, result)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="benchmarks (medians over repeated runs)")
    parser.add_argument("name", choices=sorted(BENCHES), help="which benchmark")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--data", type=Path, help="OPV2V-layout folder instead of a synthetic world (fusion, codec)")
    parser.add_argument("--plot", type=Path, help="write a PNG of the result (codec: AP against bytes)")
    parser.add_argument("--checkpoint", type=Path, help="detector weights (codec: default mobiledet_tiny; pose: mobiledet_tiny_jitter; camera: camera_crossing)")
    parser.add_argument("--codec", type=Path, help="codec weights (codec; default: the one trained for the detector)")
    parser.add_argument("--counts", default="2,4,8,16", help="scale: agent counts to run, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="scale: seconds of streaming per agent count")
    parser.add_argument("--fusion-threads", type=int, default=2, help="scale: torch threads of the fusion node")
    parser.add_argument("--losses", default="0,10,20,30,40", help="loss: packet loss percentages, comma-separated")
    parser.add_argument("--modes", default="substitution,no_substitution,grpc_tcp,datagram",
                        help="loss: modes to run, comma-separated")
    parser.add_argument("--rate-hz", type=float, default=5.0,
                        help="loss: sensor rate (frames per second per agent; 10 wants a faster machine than 2 cores)")
    parser.add_argument("--caps", default="2mbit",
                        help="loss: per-agent bandwidth caps (tc rates, e.g. 2mbit,300kbit) run with rate control "
                             "on and off; empty for none")
    parser.add_argument("--cap-mode", choices=("substitution", "datagram"), default="substitution",
                        help="loss: the link of the cap runs (WebRTC data channel or UDP datagrams)")
    parser.add_argument("--cap-fixed-level", type=int, default=4,
                        help="loss: codec rate level of the senders when rate control is off under a cap")
    parser.add_argument("--rate-level", type=int, default=0, help="loss: codec rate level without rate control")
    parser.add_argument("--repeats", type=int, default=1, help="loss: runs per setting (medians are reported)")
    parser.add_argument("--deadline-ms", type=float, default=300.0, help="loss: the fusion node's slot deadline")
    parser.add_argument("--max-age-ms", type=float, default=600.0, help="loss: oldest evidence the fusion node uses")
    parser.add_argument("--peak-window", type=int, choices=(1, 3, 5),
                        help="models: the decoder's heat-map peak window (default: each checkpoint's, 3)")
    parser.add_argument("--peak-ratio", type=unit_interval,
                        help="models: the decoder's peak ratio, 0 to 1 (default: each checkpoint's, 0.5)")
    parser.add_argument("--noise-levels", default="0,0.2,0.4,0.6",
                        help="pose: pose noise levels, metres and degrees alike, comma-separated")
    parser.add_argument("--camera-agents", type=int, default=2,
                        help="camera: agents (the last by id) that sense with cameras instead of LiDAR in the "
                             "town, 0 to skip that setting")
    parser.add_argument("--chat-losses", default="0,10,20,30",
                        help="chat: UDP loss percentages for the video chat, comma-separated ('' skips them)")
    parser.add_argument("--sample-fps", type=float, default=2.0, help="chat: frames per second the model reads")
    parser.add_argument("--chat-max-age-ms", dest="max_age_ms_chat", type=float, default=300.0,
                        help="chat: a sampled frame older than this is replaced by the last good one")
    parser.add_argument("--send-fps", type=float, help="chat: frame rate the server asks of the sender "
                        "(default: 3 per sample, 5 at least)")
    parser.add_argument("--video", type=Path, help="chat: a recording to measure the bitrate on (default: a "
                        "synthetic clip of --seed)")
    parser.add_argument("--no-bitrate", action="store_true", help="chat: skip the context-aware bitrate part")
    parser.add_argument("--feedback-delay", type=int, default=1,
                        help="pose: frames before the node's pose estimate reaches the agent (closed loop)")
    parser.add_argument("--scan-every", type=int, default=2,
                        help="pose: a registration scan with one frame in this many per non-ego agent (the ego: every frame)")
    parser.add_argument("--no-latency", dest="latency", action="store_false",
                        help="pose: skip the delayed-agents runs (latency compensation)")
    add_world_options(parser)
    parser.set_defaults(func=cmd_bench)
