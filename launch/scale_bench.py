"""``cpstream bench scale``: fusion tick time and achieved rate against the number of agents.

The fusion node runs as its own process (``cpstream fusion``), as in a deployment;
this process plays N agents into it over gRPC on loopback at the sensor rate. The
agents' frames are real coded frames (codec level 0, the agents' own object lists)
computed once beforehand from a synthetic world, so the benchmark measures the
fusion node and the links, not N copies of the model competing for two cores. A world
has at most 8 agents; beyond that, agent ``k`` replays the frames of agent ``k mod 8``
under its own id (same poses and features: the same warp, merge and decode work).

Per run: ``tick_ms`` is the time from the start of fusing a slot to publishing it
(decode of late arrivals, warp, merge, detection, message), ``rate_hz`` the fused
frames per second achieved against the sensor rate, ``per_agent_ms`` the tick time
over the agent count, ``decode_ms_per_agent`` the decode stage per agent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from agents import AgentNode, AgentNodeConfig, FrameSource, SourceConfig, SyntheticWorld
from launch.console import console, progress
from launch.datasets import HELD_OUT_SEED
from launch.launcher import percentiles
from launch.world_cmd import world_config
from models.codec_train import load_codec
from models.detector import load_checkpoint
from protos import FeatureFrame, FusedFrame
from transport import FeatureUplink, subscribe, wait_serving

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_WORLD_AGENTS = 8


def coded_frames(args: argparse.Namespace, frames: int) -> dict[int, list[FeatureFrame]]:
    """Per world agent, ``frames`` coded FeatureFrames (computed once)."""
    config = world_config(args)
    updates = {"agents": MAX_WORLD_AGENTS, "frames": frames, "seed": HELD_OUT_SEED if args.seed is None else args.seed,
               "camera": config.camera.model_copy(update={"count": 0})}
    config = config.model_copy(update=updates)
    detector, _ = load_checkpoint(args.checkpoint or REPO_ROOT / "models/checkpoints/mobiledet_tiny.pt")
    codec, _ = load_codec(args.codec or REPO_ROOT / "models/checkpoints/codec_mobiledet_tiny.pt", detector.config)
    world = SyntheticWorld(config)
    out: dict[int, list[FeatureFrame]] = {}
    with progress() as bar:
        task = bar.add_task("coding every agent's frames once", total=len(world.agent_ids) * frames)
        for agent_id in world.agent_ids:
            node = AgentNode(AgentNodeConfig(agent_id=agent_id, source=SourceConfig(world=config)), detector.eval(),
                             codec.eval(), FrameSource(SourceConfig(world=config), agent_id))
            out[agent_id] = []
            for index in range(frames):
                out[agent_id].append(node.compute(index, 1))
                bar.advance(task)
    return out


async def run_one(frames: dict[int, list[FeatureFrame]], agents: int, seconds: float, rate_hz: float,
                  fusion_threads: int) -> dict:
    """One fusion process, ``agents`` uplinks at ``rate_hz`` for ``seconds``; tick statistics."""
    sources = list(frames)
    run_dir = Path(tempfile.mkdtemp(prefix="cpstream-scale-"))
    config = run_dir / "fusion.json"
    config.write_text(json.dumps({"listen": "127.0.0.1:0", "allow_any_agent": True, "rate_hz": rate_hz,
                                  "deadline_ms": 100, "threads": fusion_threads}))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "launch.cli", "fusion", "--config", str(config), "--handshake",
        "--report", str(run_dir / "report.json"), stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=120)
        address = f"127.0.0.1:{json.loads(line)['port']}"
        await wait_serving(address)
        ids = list(range(agents))
        uplinks = {a: FeatureUplink(address, a) for a in ids}
        links = [asyncio.create_task(u.run()) for u in uplinks.values()]
        fused: list[FusedFrame] = []
        subscribed, finished = asyncio.Event(), asyncio.Event()
        period_ns = round(1e9 / rate_hz)
        slots = int(seconds * rate_hz)

        async def collect() -> None:
            async for frame in subscribe(address, subscribed=subscribed):
                fused.append(frame)
                if frame.sequence >= last_slot:
                    finished.set()

        last_slot = 1 << 62
        collector = asyncio.create_task(collect())
        await asyncio.wait_for(subscribed.wait(), timeout=30)
        await asyncio.wait_for(asyncio.gather(*(u.connected.wait() for u in uplinks.values())), timeout=30)
        start_ns = (time.time_ns() // period_ns + 2) * period_ns
        last_slot = start_ns // period_ns + slots - 1
        for k in range(slots):
            capture_ns = start_ns + k * period_ns
            await asyncio.sleep(max(0.0, (capture_ns - time.time_ns()) / 1e9))  # the sensor clock
            for a in ids:
                message = FeatureFrame()
                message.CopyFrom(frames[sources[a % len(sources)]][k % len(frames[sources[0]])])
                message.agent_id, message.sequence, message.capture_time_ns = a, k, capture_ns
                uplinks[a].offer(message)
        with contextlib.suppress(TimeoutError):  # the last slot is fused by its deadline, or never
            await asyncio.wait_for(finished.wait(), timeout=5.0)
        for u in uplinks.values():
            u.close()
        await asyncio.wait_for(asyncio.gather(*links, return_exceptions=True), timeout=10)
        collector.cancel()
        await asyncio.gather(collector, return_exceptions=True)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), timeout=20)
    used = [f for f in fused if f.contributions and f.sequence >= start_ns // period_ns]
    tick = [(f.publish_time_ns - f.fusion_time_ns) / 1e6 for f in used]
    decode = [next((s.duration_ms for s in f.stage_timings if s.stage == "decode"), 0.0) for f in used]
    complete = [f for f in used if sum(c.status == 1 for c in f.contributions) == agents]
    span_s = (used[-1].publish_time_ns - used[0].publish_time_ns) / 1e9 if len(used) > 1 else float("nan")
    return {"agents": agents, "slots": slots, "frames_fused": len(used), "frames_complete": len(complete),
            "tick_ms": percentiles(tick), "latency_ms": percentiles([f.latency_ms for f in used]),
            "rate_hz": round((len(used) - 1) / span_s, 2) if len(used) > 1 else 0.0,
            "per_agent_ms": round(float(np.median(tick)) / agents, 2) if tick else None,
            "decode_ms_per_agent": round(float(np.median(decode)) / agents, 2) if decode else None}


def bench_scale(args: argparse.Namespace) -> dict:
    counts = [int(n) for n in args.counts.split(",")]
    seconds, rate_hz = args.seconds, 10.0
    torch.set_num_threads(1)
    frames = coded_frames(args, frames=min(int(seconds * rate_hz), 50))
    runs = []
    for n in counts:
        run = asyncio.run(run_one(frames, n, seconds, rate_hz, args.fusion_threads))
        console.print(f"{n:>3} agents: tick p50 {run['tick_ms']['p50']} ms, p99 {run['tick_ms']['p99']} ms, "
                      f"{run['rate_hz']} Hz of {rate_hz:g}, {run['frames_complete']}/{run['frames_fused']} complete")
        runs.append(run)
    return {"rate_hz_target": rate_hz, "seconds": seconds, "fusion_threads": args.fusion_threads, "runs": runs}
