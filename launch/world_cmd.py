"""``cpstream world generate`` and ``cpstream world stats``."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import yaml
from rich.markup import escape
from rich.table import Table

from agents import DatasetError, OPV2VDataset, SyntheticWorld, WorldConfig, visibility_stats, write_scene_frame
from launch.console import console, progress, write_json


def add_world_options(parser: argparse.ArgumentParser) -> None:
    """Options that choose a synthetic world (shared by world generate, eval and bench)."""
    parser.add_argument("--config", type=Path, help="world config YAML (fields of WorldConfig); flags override it")
    parser.add_argument("--seed", type=int, help="world seed (default 0)")
    parser.add_argument("--agents", type=int, help="agents in total, 2..8 (default 4)")
    parser.add_argument("--roadside-units", type=int, help="how many agents are roadside units (default: one per four agents, at least one)")
    parser.add_argument("--frames", type=int, help="frames at 10 Hz (default 100)")
    parser.add_argument("--cameras", type=int, help="cameras per agent, 0..4 (default 1); bench camera: pole "
                        "cameras at the crossing, 1..8 (default 5)")
    parser.add_argument("--pose-noise", metavar="M,DEG",
                        help="standard deviation of reported position (m) and heading (deg), e.g. 0.2,0.5")


def world_config(args: argparse.Namespace) -> WorldConfig:
    """The WorldConfig from ``--config`` and the flags (validated; errors name the field)."""
    fields: dict = {}
    if args.config is not None:
        fields = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(fields, dict):
            raise ValueError(f"{args.config}: expected a mapping of WorldConfig fields")
    for flag, key in (("seed", "seed"), ("agents", "agents"), ("roadside_units", "roadside_units"),
                      ("frames", "frames")):
        if getattr(args, flag) is not None:
            fields[key] = getattr(args, flag)
    if args.cameras is not None:
        fields["camera"] = {**fields.get("camera", {}), "count": args.cameras}
    if args.pose_noise is not None:
        metres, degrees = parse_pair(args.pose_noise, "--pose-noise")
        fields["noise"] = {**fields.get("noise", {}), "pose_xy_m": metres, "pose_yaw_deg": degrees}
    return WorldConfig.model_validate(fields)


def parse_pair(text: str, flag: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError as err:
        raise ValueError(f"{flag} expects two numbers 'M,DEG', got {text!r}") from err
    return a, b


def unit_interval(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def cmd_generate(args: argparse.Namespace) -> int:
    config = world_config(args)
    world = SyntheticWorld(config)
    render_s, write_s = [], []
    with progress() as bar:
        task = bar.add_task(f"{world.scenario}: {config.agents} agents", total=len(world))
        for index in range(len(world)):
            start = time.perf_counter()
            frame = world.frame(index)
            rendered = time.perf_counter()
            write_scene_frame(args.out, frame)
            render_s.append((rendered - start) / config.agents)
            write_s.append((time.perf_counter() - rendered) / config.agents)
            bar.advance(task)
    render, write = statistics.median(render_s), statistics.median(write_s)
    console.print(f"wrote {len(world)} frames x {config.agents} agents to {args.out / world.scenario}")
    console.print(f"per agent-frame (LiDAR + {config.camera.count} camera(s)), median: render {render:.3f} s, "
                  f"write {write:.3f} s, total {render + write:.3f} s")
    return 0


def _stats_frames(dataset: OPV2VDataset, skip_bad: bool, skipped: list[str]):
    with progress() as bar:
        task = bar.add_task("scoring visibility", total=len(dataset))
        for scenario in dataset.scenarios:
            for index in range(len(scenario)):
                bar.advance(task)
                try:
                    yield scenario.frame(index)
                except DatasetError as err:
                    if not skip_bad:
                        raise
                    skipped.append(str(err))


def cmd_stats(args: argparse.Namespace) -> int:
    dataset = OPV2VDataset(args.data, load_images=False)
    skipped: list[str] = []
    stats = visibility_stats(_stats_frames(dataset, args.skip_bad, skipped), args.radius, args.min_points)
    report = {**stats.as_dict(), "frames_skipped": len(skipped), "skipped": skipped}
    table = Table(title=f"visibility within {args.radius:g} m of the ego (>= {args.min_points} LiDAR points)")
    for column in ("class", "objects", "ego sees %", "any agent sees %", "gap (points)"):
        table.add_column(column, justify="right")
    rows = [("all", stats.overall)] + sorted(stats.by_class.items())
    for name, tally in rows:
        d = tally.as_dict()
        table.add_row(name, str(d["objects"]), str(d["ego_visible_pct"]), str(d["union_visible_pct"]),
                      str(d["gap_pct_points"]))
    console.print(table)
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} bad frame(s); first: {escape(skipped[0])}", emoji=False)
    write_json(args.json, report)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    world = sub.add_parser("world", help="generate or inspect synthetic worlds (OPV2V layout)")
    verbs = world.add_subparsers(dest="verb", required=True)
    gen = verbs.add_parser("generate", help="write a seeded synthetic scenario in the OPV2V layout")
    gen.add_argument("--out", type=Path, required=True, help="dataset root; the scenario goes in a subfolder")
    add_world_options(gen)
    gen.set_defaults(func=cmd_generate)
    stats = verbs.add_parser("stats", help="who sees what: ego-only versus any-agent visibility")
    stats.add_argument("data", type=Path, help="dataset root or scenario folder (OPV2V layout)")
    stats.add_argument("--json", type=Path, help="write the figures to this JSON file")
    stats.add_argument("--radius", type=float, default=50.0, help="objects within this many metres of the ego")
    stats.add_argument("--min-points", type=int, default=5, help="LiDAR points on an object to count as seen")
    stats.add_argument("--skip-bad", action="store_true", help="skip unreadable frames (counted) instead of failing")
    stats.set_defaults(func=cmd_stats)
