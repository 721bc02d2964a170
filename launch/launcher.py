"""``cpstream launch FILE``: start a fusion node and agent processes, watch them, score, report.

A launch file (YAML) has up to four parts:

- ``world``: the embedded synthetic world (``WorldConfig`` fields). With ``source: folder``
  (the default) it is rendered once into ``cache_dir`` and agents play it back at the sensor
  rate (rendering every agent live costs more CPU than the models); ``source: world`` renders
  each agent's frames live in its own process.
- ``crossing`` instead of ``world``: the pole-camera crossing (``CrossingConfig`` fields); every pole
  is a camera agent rendering its own camera live, and fused frames are scored by MODA / MODP of
  the people in the plaza (detections scoring at least ``moda_threshold``).
- ``fusion``: the fusion node's settings (``FusionConfig``); omit it to run agents only.
- ``agents``: ``all`` (one per world agent) or a list of agent settings (``AgentNodeConfig``
  fields), each merged over ``agent_defaults``; omit it to run the fusion node only.
- run settings: ``rate_hz``, ``frames``.

Children are ``cpstream fusion`` / ``cpstream agent`` processes. The launcher waits on
events (the fusion node's health turning SERVING, each child's ready line), starts every
agent on one shared sensor clock, subscribes to the fused frames, scores them against
the world's ground truth as they come, shows a live table, and writes the report when the
agents are done, or on Ctrl-C after stopping every child.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.live import Live
from rich.table import Table

from agents import Scenario, SyntheticWorld, WorldConfig, write_scene_frame
from agents.world.crossing import CrossingConfig, CrossingWorld
from agents.node import AgentNodeConfig, bev_input
from fusion.node import FusionConfig
from launch.config_files import load_config_file
from launch.console import console, progress, write_json
from launch.record import Recorder
from launch.samples import coop_sample
from models.detector import DetectorConfig
from models.geometry import invert_se3, transform_boxes
from models.metrics import APAccumulator, ModaAccumulator
from protos import ContributionStatus, FusedFrame
from transport import boxes_from_proto, pose_from_proto, subscribe, wait_serving

REPO_ROOT = Path(__file__).resolve().parent.parent
USED = (ContributionStatus.CONTRIBUTION_STATUS_FRESH, ContributionStatus.CONTRIBUTION_STATUS_SUBSTITUTED)
"""Contribution statuses whose evidence went into a fused frame."""


class LaunchConfig(BaseModel):
    """A launch file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    world: WorldConfig | None = None
    data: Path | None = None
    """Instead of ``world``: an OPV2V-layout scenario folder (a recorded drive, or one ``cpstream world
    generate`` wrote), played by one agent per agent folder at ``rate_hz`` and scored against its labels."""
    crossing: CrossingConfig | None = None
    """Instead of ``world``: the pole-camera crossing, one camera agent per pole (each renders its camera
    live), scored by MODA / MODP of the people in the plaza."""
    moda_threshold: float = Field(0.4, ge=0.0, le=1.0)
    """With ``crossing``: a fused detection counts as a person from this score on (``cpstream bench camera``
    chooses its thresholds on a training crossing; 0.35-0.4 there)."""
    source: Literal["folder", "world"] = "folder"
    cache_dir: Path = Path("out/launch-worlds")
    """Where rendered worlds are kept between runs (relative to the repository root)."""
    rate_hz: float = Field(10.0, gt=0.0)
    frames: int | None = Field(None, ge=1)
    """Sensor frames per agent (default: the world's)."""
    fusion: dict | None = None
    agent_defaults: dict = {}
    agents: list[dict] | Literal["all"] | None = None
    score: bool = True
    """Score fused frames against the world's ground truth (needs ``world``)."""
    agent_niceness: int = Field(0, ge=0, le=19)
    """Run agent processes this much nicer than the fusion node (on one machine, the fusion of a
    slot then never waits behind the agents' work on the next one)."""
    deadline_grace_s: float = Field(3.0, ge=0.0)
    """After the agents finish, how long to wait for the last slots to be fused."""
    agent_netns: dict[int, str] = {}
    """Agent id -> Linux network namespace to run that agent in (``ip netns exec``; needs root), e.g. one
    joined to the fusion node's by an impaired link (``cpstream bench loss`` sets this up)."""
    agent_fusion_host: dict[int, str] = {}
    """Agent id -> the address at which that agent reaches the fusion node (default: the fusion's listen host)."""


@dataclass
class GroundTruth:
    """Per frame index: boxes in the ego's BEV frame and that frame's place in the world."""

    boxes: list[np.ndarray] = field(default_factory=list)
    world_from_ego: list[np.ndarray] = field(default_factory=list)


@dataclass
class Progress:
    fused: list[FusedFrame] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    ap: APAccumulator = field(default_factory=APAccumulator)
    moda: ModaAccumulator | None = None
    """People on the ground plane (a crossing), instead of vehicle AP."""
    moda_threshold: float = 0.4
    scored: int = 0
    last_slot: int = -1
    per_agent: dict[int, dict] = field(default_factory=dict)
    updated: asyncio.Event = field(default_factory=asyncio.Event)


def load_launch_config(path: Path, sets: list[str]) -> LaunchConfig:
    return LaunchConfig.model_validate(load_config_file(path, sets))


def _resolve(path: Path) -> Path:
    return path if path.is_absolute() else REPO_ROOT / path


def world_folder(config: LaunchConfig) -> Path:
    """The scenario folder of the rendered world (rendered now unless it is in the cache)."""
    world = config.world.model_copy(update={"camera": config.world.camera.model_copy(update={"count": 0})})
    key = hashlib.sha1(world.model_dump_json().encode()).hexdigest()[:10]
    root = _resolve(config.cache_dir) / f"seed{world.seed}-a{world.agents}-f{world.frames}-{key}"
    synthetic = SyntheticWorld(world)
    folder = root / synthetic.scenario
    if (root / ".complete").exists():
        return folder
    with progress() as bar:
        task = bar.add_task(f"rendering the world once ({world.agents} agents, {world.frames} frames)",
                            total=len(synthetic))
        for index in range(len(synthetic)):
            write_scene_frame(root, synthetic.frame(index))
            bar.advance(task)
    (root / ".complete").write_text(world.model_dump_json())
    return folder


def ground_truth(folder: Path | None, world: WorldConfig | None, frames: int,
                 detector: DetectorConfig, cache: Path | None = None) -> GroundTruth:
    """What a fused frame is scored against: as ``cpstream eval`` places it, frame by frame.

    With ``cache`` (a rendered world's folder, which never changes once complete) the result is
    kept there per detector grid and read back next time instead of placed again (the placing
    costs about a third of a second per frame, longer than streaming the frame).
    """
    grid, lattice = detector.grid.build(), detector.feature_cell_m
    path = None
    if cache is not None:
        key = hashlib.sha1(json.dumps([detector.grid.model_dump(mode="json"), lattice]).encode()).hexdigest()[:10]
        path = cache / f"ground-truth-{key}.npz"
        cached = _cached_truth(path, frames)
        if cached is not None:
            return cached
    source = Scenario(folder, load_images=False) if folder is not None else SyntheticWorld(world)
    truth = GroundTruth()
    with progress() as bar:
        task = bar.add_task("ground truth", total=frames)
        for index in range(frames):
            frame = source.frame(index)
            truth.boxes.append(coop_sample(frame, grid, lattice).gt_boxes)
            truth.world_from_ego.append(bev_input(frame.agents[frame.ego_id], lattice)[0])
            bar.advance(task)
    if path is not None:
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, world_from_ego=np.stack(truth.world_from_ego) if frames else np.zeros((0, 4, 4)),
                 **{f"boxes_{k}": b for k, b in enumerate(truth.boxes)})
        tmp.replace(path)
    return truth


def crossing_truth(crossing: CrossingWorld, frames: int) -> GroundTruth:
    """The people in the plaza per frame, in the site frame (every pole's BEV frame, and so the ego's)."""
    half = crossing.config.half_size_m
    truth = GroundTruth()
    for index in range(frames):
        boxes = crossing.boxes[index]
        truth.boxes.append(boxes[np.all(np.abs(boxes[:, :2]) <= half, axis=1)])
        truth.world_from_ego.append(np.eye(4))
    return truth


def _cached_truth(path: Path, frames: int) -> GroundTruth | None:
    """The first ``frames`` frames of a cached ground truth, or None when it is absent or shorter."""
    if not path.exists():
        return None
    with np.load(path) as blob:
        poses = blob["world_from_ego"]
        if len(poses) < frames:
            return None
        return GroundTruth(boxes=[blob[f"boxes_{k}"] for k in range(frames)],
                           world_from_ego=[poses[k] for k in range(frames)])


def _detector_config(agent_defaults: dict, fusion: dict | None) -> DetectorConfig:
    path = Path((fusion or {}).get("detector") or agent_defaults.get("detector") or FusionConfig().detector)
    blob = torch.load(_resolve(path), map_location="cpu", weights_only=True)
    return DetectorConfig.model_validate(blob["config"])


class Child:
    """One node process with the ready-line handshake."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, report: Path) -> None:
        self.name, self.process, self.report = name, process, report

    @classmethod
    async def spawn(cls, name: str, role: str, config: dict, run_dir: Path, niceness: int = 0,
                    netns: str | None = None) -> Child:
        config_path, report = run_dir / f"{name}.json", run_dir / f"{name}-report.json"
        config_path.write_text(json.dumps(config, default=str))
        # `nice` rather than a preexec hook: without one, the child is started without fork() and
        # gRPC's fork handlers (and their warnings) stay out of it.
        nice = ["nice", "-n", str(niceness)] if niceness else []
        namespace = ["ip", "netns", "exec", netns] if netns else []
        process = await asyncio.create_subprocess_exec(
            *namespace, *nice, sys.executable, "-m", "launch.cli", role, "--config", str(config_path), "--report", str(report),
            "--handshake", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        return cls(name, process, report)

    async def ready(self, timeout_s: float = 120.0) -> dict:
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout=timeout_s)
        except TimeoutError:
            line = b""
        if not line:
            try:
                code = await asyncio.wait_for(self.process.wait(), timeout=5.0)
            except TimeoutError:
                code = "still running"
            raise RuntimeError(f"{self.name} did not start (exit code {code}); see its log above")
        return json.loads(line)

    def send(self, text: str) -> None:
        self.process.stdin.write(text.encode() + b"\n")

    def signal(self, sig: int) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    async def stop(self, timeout_s: float = 10.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), timeout=timeout_s)
        except TimeoutError:
            self.signal(signal.SIGKILL)
            return await self.process.wait()

    def read_report(self) -> dict:
        try:
            return json.loads(self.report.read_text())
        except (OSError, ValueError):
            return {}


def _score(progress_: Progress, fused: FusedFrame, truth: GroundTruth | None, start_slot: int) -> None:
    progress_.fused.append(fused)
    progress_.last_slot = max(progress_.last_slot, fused.sequence)
    used = any(c.status in USED for c in fused.contributions)
    if used:
        progress_.latency_ms.append(fused.latency_ms)
    for c in fused.contributions:
        entry = progress_.per_agent.setdefault(c.agent_id, {})
        entry["status"] = ContributionStatus.Name(c.status).removeprefix("CONTRIBUTION_STATUS_").lower()
        if c.status == ContributionStatus.CONTRIBUTION_STATUS_FRESH:
            entry["latency_ms"] = c.age_ms
    for s in fused.link_stats:
        progress_.per_agent.setdefault(s.agent_id, {})["link"] = s
    index = fused.sequence - start_slot
    if truth is None or not 0 <= index < len(truth.boxes) or not used:
        return
    gt = truth.boxes[index]
    # Ground truth is given in the ego's frame as its own (noisy) pose places it; an ego that tracks its pose
    # builds its frame elsewhere, and says where its own fix puts that frame (reference_own_pose).
    reference = fused.reference_own_pose if fused.HasField("reference_own_pose") else fused.reference_pose
    ref_from_ego = invert_se3(pose_from_proto(reference)) @ truth.world_from_ego[index]
    if not np.allclose(ref_from_ego, np.eye(4), atol=1e-6):
        gt = transform_boxes(ref_from_ego, gt)
    found = boxes_from_proto(fused.boxes)[:, :8]
    if progress_.moda is not None:
        progress_.moda.add_frame(found[found[:, 7] >= progress_.moda_threshold, :2], gt[:, :2])
    else:
        progress_.ap.add_frame(found, gt)
    progress_.scored += 1


def _table(progress_: Progress, started: float, agents: list[int]) -> Table:
    table = Table(title="cpstream launch", caption=f"{time.monotonic() - started:.0f} s")
    for column in ("agent", "status", "fps", "bytes/frame", "latency ms", "refused"):
        table.add_column(column, justify="right")
    elapsed = max(time.monotonic() - started, 1e-3)
    for agent in agents:
        entry = progress_.per_agent.get(agent, {})
        link = entry.get("link")
        frames = link.frames_received if link else 0
        table.add_row(str(agent), entry.get("status", "-"), f"{frames / elapsed:.1f}",
                      f"{link.bytes_received / frames:.0f}" if link and frames else "-",
                      f"{entry['latency_ms']:.0f}" if "latency_ms" in entry else "-",
                      str(link.frames_refused) if link else "-")
    lat = progress_.latency_ms
    if progress_.moda is not None:
        score = "MODA " + (f"{progress_.moda.result()['moda']:.3f}" if progress_.scored else "-")
    else:
        ap = progress_.ap.result() if progress_.scored else {}
        score = "AP@0.5 " + (f"{ap['0.5']:.3f}" if ap else "-")
    table.add_row("fused", f"{len(progress_.fused)} frames", "", "",
                  f"p50 {np.percentile(lat, 50):.0f}" if lat else "-", score, style="bold")
    return table


def percentiles(values: list[float]) -> dict:
    """p50, p99 and mean, rounded (``None`` for no values)."""
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    return {"p50": round(float(np.percentile(values, 50)), 2), "p99": round(float(np.percentile(values, 99)), 2),
            "mean": round(float(np.mean(values)), 2)}


async def run_launch(config: LaunchConfig, report_path: Path | None, record_path: Path | None = None) -> dict:
    """Run everything the file describes; returns (and writes) the report."""
    if config.fusion is None and not config.agents:
        raise ValueError("the launch file has neither a 'fusion' nor an 'agents' section: nothing to run")
    if sum(x is not None for x in (config.world, config.data, config.crossing)) > 1:
        raise ValueError("a launch file plays one of 'world', 'data' (a scenario folder) or 'crossing', not several")
    if config.agents and config.world is None and config.data is None and config.crossing is None \
            and config.agents == "all":
        raise ValueError("agents: all needs a 'world', 'data' or 'crossing' section to know the agents")
    if record_path is not None and config.fusion is None:  # --record
        raise ValueError("--record needs a 'fusion' section: what is recorded is the fused session")
    folder = world_folder(config) if config.world is not None and config.source == "folder" else None
    world = config.world
    scenario = None
    if config.data is not None:
        folder = _resolve(config.data)
        scenario = Scenario(folder, load_images=False)  # names what is wrong with the folder
    crossing = CrossingWorld(config.crossing) if config.crossing is not None else None
    frames = config.frames or (world.frames if world is not None else len(scenario) if scenario
                               else len(crossing) if crossing else None)
    if world is not None and frames > world.frames:
        raise ValueError(f"frames={frames} but the world has {world.frames} (set world.frames too)")
    if crossing is not None and frames > len(crossing):
        raise ValueError(f"frames={frames} but the crossing has {len(crossing)} (set crossing.frames too)")
    if config.agents != "all":
        agent_ids = [int(a["agent_id"]) for a in (config.agents or [])]
    elif crossing is not None:
        agent_ids = list(crossing.agent_ids)
    else:
        agent_ids = list(scenario.agent_ids) if scenario is not None else list(SyntheticWorld(world).agent_ids)
    if folder is not None:
        frames = min(frames, len(Scenario(folder, load_images=False)))
    truth = None
    if config.score and (world is not None or scenario is not None) and config.fusion is not None and frames:
        cache = folder.parent if folder is not None and config.data is None else None  # a rendered world's root
        truth = ground_truth(folder, world, frames, _detector_config(config.agent_defaults, config.fusion), cache)
    elif config.score and crossing is not None and config.fusion is not None and frames:
        truth = crossing_truth(crossing, frames)

    fusion_cfg = dict(config.fusion or {})
    tokens = {int(k): str(v) for k, v in (fusion_cfg.get("tokens") or {}).items()}
    if config.fusion is not None and not tokens and not fusion_cfg.get("allow_any_agent"):
        tokens = {a: secrets.token_hex(16) for a in agent_ids}  # a fresh credential per agent per launch
        fusion_cfg["tokens"] = tokens
    fusion_cfg.setdefault("rate_hz", config.rate_hz)

    run_dir = Path(tempfile.mkdtemp(prefix="cpstream-launch-"))
    children: list[Child] = []
    progress_ = Progress(moda=ModaAccumulator() if crossing is not None else None, moda_threshold=config.moda_threshold)
    report: dict = {"interrupted": False}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # asyncio's remove_signal_handler leaves the default action, not the handler before it: a caller's
    # own handler (bench loss deletes its namespaces on SIGTERM) is put back at the end.
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    subscriber = None
    recorder = None  # --record
    start_slot = 0
    try:
        address = fusion_cfg.get("listen", FusionConfig().listen)
        fusion = None
        webrtc_port = udp_port = None
        if config.fusion is not None:
            fusion = await Child.spawn("fusion", "fusion", fusion_cfg, run_dir)
            children.append(fusion)
            ready = await _ready_or_stop(fusion, stop)
            webrtc_port, udp_port = ready.get("webrtc_port"), ready.get("udp_port")
            address = f"{address.rsplit(':', 1)[0]}:{ready['port']}"
            await wait_serving(address.replace("0.0.0.0:", "127.0.0.1:"))
        agents: list[Child] = []
        for entry in ([{"agent_id": a} for a in agent_ids] if config.agents == "all" else (config.agents or [])):
            agent_id = int(entry["agent_id"])
            host = config.agent_fusion_host.get(agent_id, address.rsplit(":", 1)[0])
            agent_cfg = {**config.agent_defaults, **entry,
                         "fusion": entry.get("fusion", f"{host}:{address.rsplit(':', 1)[1]}"), "rate_hz": config.rate_hz}
            if agent_cfg.get("transport") == "webrtc" and "webrtc" not in entry:
                if webrtc_port is None:
                    raise ValueError(f"agent {agent_id} uses transport webrtc but the fusion node has no "
                                     "webrtc_listen (set fusion.webrtc_listen, e.g. 0.0.0.0:0)")
                agent_cfg["webrtc"] = f"http://{host}:{webrtc_port}"
            if agent_cfg.get("transport") == "udp" and "udp" not in entry:
                if udp_port is None:
                    raise ValueError(f"agent {agent_id} uses transport udp but the fusion node has no "
                                     "udp_listen (set fusion.udp_listen, e.g. 0.0.0.0:0)")
                agent_cfg["udp"] = f"{host}:{udp_port}"
            if tokens and "token" not in entry:
                agent_cfg["token"] = tokens.get(agent_id, "")
            if frames is not None:
                agent_cfg["frames"] = frames
            if (world is not None or scenario is not None) and "source" not in entry:
                agent_cfg["source"] = ({"kind": "folder", "folder": str(folder)} if folder is not None
                                       else {"kind": "world", "world": world.model_dump(mode="json")})
            elif crossing is not None and "source" not in entry:
                agent_cfg["source"] = {"kind": "crossing", "crossing": crossing.config.model_dump(mode="json")}
            AgentNodeConfig.model_validate(agent_cfg)  # fail here, naming the field, not in a child
            child = await Child.spawn(f"agent{agent_id}", "agent", agent_cfg, run_dir, config.agent_niceness,
                                      config.agent_netns.get(agent_id))
            children.append(child)
            agents.append(child)
        for child in agents:
            await _ready_or_stop(child, stop)
        period_ns = round(1e9 / config.rate_hz)
        start_ns = ((time.time_ns() + 500_000_000) // period_ns + 1) * period_ns  # on the fusion's slot grid
        start_slot = start_ns // period_ns
        for child in agents:
            child.send(str(start_ns))
        console.print(f"streaming: {len(agents)} agent(s) to the fusion node at {address}, "
                      f"{frames or 'all'} frames at {config.rate_hz:g} Hz", highlight=False)
        if fusion is not None:
            if record_path is not None:  # --record: the session to MCAP (launch/record.py)
                recorder = Recorder(record_path, folder=folder, truth=truth, start_slot=start_slot,
                                    period_ns=period_ns, agent_ids=agent_ids, fusion=fusion_cfg)
            subscriber = asyncio.create_task(_collect(address.replace("0.0.0.0:", "127.0.0.1:"), progress_, truth,
                                                      start_slot, recorder))
        with Live(_table(progress_, started, agent_ids), console=console, refresh_per_second=2,
                  transient=not console.is_terminal) as live:
            # Run until the agents are done; with no agents (a fusion-only launch) until Ctrl-C or the node exits.
            waiting = [asyncio.ensure_future(c.process.wait()) for c in (agents or children)]
            stopper = asyncio.ensure_future(stop.wait())
            while not stop.is_set() and not all(w.done() for w in waiting):
                await asyncio.wait([*waiting, stopper], timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                live.update(_table(progress_, started, agent_ids))
            if not stop.is_set() and fusion is not None and frames:
                await _last_slot(progress_, start_slot + frames - 1, config.deadline_grace_s, stop)
            live.update(_table(progress_, started, agent_ids))
            stopper.cancel()
        report["interrupted"] = stop.is_set()
    finally:
        for child in reversed(children):  # agents first, the fusion node last
            await child.stop()
        if subscriber is not None:
            subscriber.cancel()
            await asyncio.gather(subscriber, return_exceptions=True)
        if recorder is not None:  # --record: drain the queue and finish the file (also after Ctrl-C)
            report["record"] = await asyncio.to_thread(recorder.close)
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            if handler is not None:
                signal.signal(sig, handler)
        report.update(_report(config, children, progress_, truth, frames, agent_ids))
        report["wall_s"] = round(time.monotonic() - started, 1)
        write_json(report_path, report)
        if report_path is not None:
            _write_timeline(report_path.with_suffix(".frames.jsonl"), progress_.fused)
    return report


async def _ready_or_stop(child: Child, stop: asyncio.Event) -> dict:
    ready = asyncio.ensure_future(child.ready())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([ready, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not ready.done():
        ready.cancel()
        raise KeyboardInterrupt
    return ready.result()


async def _collect(address: str, progress_: Progress, truth: GroundTruth | None, start_slot: int,
                   recorder: Recorder | None = None) -> None:
    async for fused in subscribe(address, recorder.request if recorder is not None else None):
        if recorder is not None:  # --record
            recorder.add(fused)
        _score(progress_, fused, truth, start_slot)
        progress_.updated.set()


async def _last_slot(progress_: Progress, slot: int, grace_s: float, stop: asyncio.Event) -> None:
    """Wait (on fused-frame events) until ``slot`` is fused, for at most ``grace_s``."""
    deadline = time.monotonic() + grace_s
    while progress_.last_slot < slot and not stop.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        progress_.updated.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(progress_.updated.wait(), timeout=remaining)


def _write_timeline(path: Path, fused: list[FusedFrame]) -> None:
    """One line per fused frame beside the report: slot, latency, stage times, and per agent its status, the age
    of its newest evidence (ms), its tiles fresh / substituted / dropped and the substituted tiles' mean age (ms)."""
    with path.open("w") as out:
        for f in fused:
            out.write(json.dumps({
                "slot": f.sequence, "latency_ms": round(f.latency_ms, 2), "boxes": len(f.boxes),
                "stages_ms": {s.stage: round(s.duration_ms, 2) for s in f.stage_timings},
                "agents": {str(c.agent_id): [ContributionStatus.Name(c.status).removeprefix("CONTRIBUTION_STATUS_"),
                                             round(c.age_ms, 1), c.tiles_fresh, c.tiles_substituted, c.tiles_dropped,
                                             round(c.substituted_age_ms, 1)]
                           for c in f.contributions}}) + "\n")


def _report(config: LaunchConfig, children: list[Child], progress_: Progress, truth: GroundTruth | None,
            frames: int | None, agent_ids: list[int]) -> dict:
    reports = {c.name: c.read_report() for c in children}
    fusion_report = reports.get("fusion", {})
    ap = progress_.ap.result() if progress_.scored and progress_.moda is None else {}
    agents = {}
    for agent in agent_ids:
        own = reports.get(f"agent{agent}", {})
        agents[str(agent)] = {**own, "fusion": fusion_report.get("agents", {}).get(str(agent), {})}
    stages: dict[str, list[float]] = {}
    for fused in progress_.fused:
        for stage in fused.stage_timings:
            stages.setdefault(stage.stage, []).append(stage.duration_ms)
    return {
        "latency_ms": percentiles(progress_.latency_ms),
        "bytes_per_frame": {str(a): agents[str(a)].get("bytes_per_frame") for a in agent_ids},
        "ap": {k: (None if np.isnan(v) else round(v, 4)) for k, v in ap.items()},
        **({"moda": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in progress_.moda.result().items()},
            "moda_threshold": progress_.moda_threshold} if progress_.moda is not None and progress_.scored else {}),
        "frames_fused": len([f for f in progress_.fused if any(c.status in USED for c in f.contributions)]),
        "frames_scored": progress_.scored,
        "frames": frames,
        "rate_hz": config.rate_hz,
        "stage_ms": {k: percentiles(v) for k, v in stages.items()},
        "fusion": {k: v for k, v in fusion_report.items() if k != "agents"},
        "agents": agents,
        "exit_codes": {c.name: c.process.returncode for c in children},
    }


def cmd_launch(args) -> int:
    config = load_launch_config(args.file, args.set)
    report = asyncio.run(run_launch(config, args.report, args.record))
    summary = {k: report.get(k) for k in ("latency_ms", "bytes_per_frame", "ap", "moda", "frames_fused", "interrupted")
               if k in report}
    console.print_json(json.dumps(summary))
    bad = {name: code for name, code in report["exit_codes"].items() if code not in (0, -signal.SIGTERM)}
    if report["interrupted"]:
        return 130
    if bad:
        console.print(f"[red]error:[/red] children failed: {bad}")
        return 1
    return 0


def register(sub) -> None:
    parser = sub.add_parser("launch", help="run a launch file: fusion node and agents as processes, live table, report")
    parser.add_argument("file", type=Path, help="launch YAML, e.g. launch/demo.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set frames=50 --set agent_defaults.rate_level=2")
    parser.add_argument("--report", type=Path, help="write the JSON report here")
    parser.add_argument("--record", type=Path, help="record the session to this MCAP file")
    parser.set_defaults(func=cmd_launch)


__all__ = ["LaunchConfig", "cmd_launch", "load_launch_config", "register", "run_launch"]
