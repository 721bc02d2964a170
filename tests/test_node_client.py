"""An independent gRPC implementation talks to the fusion node.

A Node.js client (``tests/node_client/subscribe.js``, on ``@grpc/grpc-js`` and
``@grpc/proto-loader``, installed from the npm registry by the set-up below) loads
``protos/cpstream.proto`` itself, subscribes to a live fusion node fed by one live
agent, and prints every ``FusedFrame`` it decodes as a JSON line. The test checks what
it decoded, and that it decoded exactly what a Python subscriber received for the same
frames (int64 times, enums by name, float32 box fields). A plain health-check client
sees SERVING first.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import protos
from protos import ContributionStatus, FusedFrame, ObjectClass, SubscribeRequest
from transport import subscribe

REPO_ROOT = Path(__file__).resolve().parent.parent
CLIENT_DIR = Path(__file__).resolve().parent / "node_client"
FRAMES_WANTED = 5
READ_TIMEOUT_S = 60.0
"""Budget for the Node client's frames once the agent is started (normally about a second)."""
START_TIMEOUT_S = 120.0
"""Budget for a node process to load its checkpoints and print its ready line."""
EXIT_TIMEOUT_S = 5.0

FUSION_CONFIG = {"listen": "127.0.0.1:0", "allow_any_agent": True, "rate_hz": 10.0, "threads": 1}
WORLD = {"seed": 3, "agents": 2, "frames": 15, "camera": {"count": 0}}


@pytest.fixture(scope="module")
def node_client() -> list[str]:
    """The command that runs ``subscribe.js``, its npm dependencies installed (skips without Node.js)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js is not installed (`node` and `npm` must be on PATH) for the grpc-js client")
    package_json = CLIENT_DIR / "package.json"
    installed = CLIENT_DIR / "node_modules" / ".package-lock.json"  # written by npm after a full install
    if not installed.exists() or installed.stat().st_mtime < package_json.stat().st_mtime:
        try:
            result = subprocess.run([npm, "install", "--no-audit", "--no-fund"], cwd=CLIENT_DIR, check=False,
                                    capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as err:
            pytest.fail(f"npm install in {CLIENT_DIR} took over {err.timeout:.0f} s:\n{err.stdout}\n{err.stderr}")
        if result.returncode != 0 or not installed.exists():
            pytest.fail(f"npm install in {CLIENT_DIR} failed (exit code {result.returncode}):\n"
                        f"{result.stdout}\n{result.stderr}")
        installed.touch()  # an install that changed nothing leaves it old: do not reinstall every run
    return [node, str(CLIENT_DIR / "subscribe.js")]


class Proc:
    """A child process with its stdout read line by line and its stderr in a log file."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: Path) -> None:
        self.name, self.process, self.log = name, process, log

    @classmethod
    async def start(cls, name: str, argv: list[str], tmp_path: Path, cwd: Path = REPO_ROOT) -> Proc:
        log = tmp_path / f"{name}.log"
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *argv, cwd=cwd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return cls(name, process, log)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            text = []
        return f"--- {self.name} stderr (last {lines} lines) ---\n" + "\n".join(text)

    async def event(self, deadline: float) -> dict:
        """The next JSON line on stdout, before ``deadline`` (``time.monotonic()``); fails on EOF or timeout."""
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            pytest.fail(f"{self.name}: no output line in time\n{self.log_tail()}")
        if not line:
            try:
                code = await asyncio.wait_for(self.process.wait(), timeout=EXIT_TIMEOUT_S)
            except TimeoutError:
                code = "none, still running"
            pytest.fail(f"{self.name} closed its stdout (exit code {code})\n{self.log_tail()}")
        try:
            return json.loads(line)
        except ValueError:
            pytest.fail(f"{self.name}: not a JSON line: {line!r}\n{self.log_tail()}")

    async def send(self, text: str) -> None:
        self.process.stdin.write(text.encode() + b"\n")
        await asyncio.wait_for(self.process.stdin.drain(), timeout=EXIT_TIMEOUT_S)

    async def wait(self, timeout_s: float) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), timeout=timeout_s)
        except TimeoutError:
            pytest.fail(f"{self.name} did not exit within {timeout_s:.0f} s\n{self.log_tail()}")

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after a few seconds."""
        if self.process.returncode is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                self.process.send_signal(sig)
            except ProcessLookupError:
                return
            try:
                await asyncio.wait_for(self.process.wait(), timeout=EXIT_TIMEOUT_S)
                return
            except TimeoutError:
                continue


def _node(role: str, config: Path, report: Path | None = None) -> list[str]:
    argv = [sys.executable, "-m", "launch.cli", role, "--config", str(config), "--handshake"]
    return argv + (["--report", str(report)] if report is not None else [])


def _health(address: str) -> dict[str, str]:
    """A plain health client: status name per service."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return {service: health_pb2.HealthCheckResponse.ServingStatus.Name(
                    stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5.0).status)
                for service in ("", "cp.v1.Fusion")}


async def _collect(address: str, into: dict[int, FusedFrame], arrived: asyncio.Event) -> None:
    async for frame in subscribe(address, SubscribeRequest(min_score=0.0)):
        into[frame.sequence] = frame
        arrived.set()


def _expected(frame: FusedFrame) -> dict:
    """What subscribe.js prints for ``frame``, built from the Python decoding of the same message."""
    pose = frame.reference_pose
    return {
        "event": "frame",
        "sequence": str(frame.sequence),
        "fusion_time_ns": str(frame.fusion_time_ns),
        "capture_time_ns": str(frame.capture_time_ns),
        "publish_time_ns": str(frame.publish_time_ns),
        "latency_ms": frame.latency_ms,
        "ego_agent_id": frame.ego_agent_id,
        "reference_pose": {"x_m": pose.x_m, "y_m": pose.y_m, "z_m": pose.z_m, "roll_rad": pose.roll_rad,
                           "pitch_rad": pose.pitch_rad, "yaw_rad": pose.yaw_rad}
        if frame.HasField("reference_pose") else None,
        "box_count": len(frame.boxes),
        "boxes": [{"x_m": b.x_m, "y_m": b.y_m, "z_m": b.z_m, "length_m": b.length_m, "width_m": b.width_m,
                   "height_m": b.height_m, "yaw_rad": b.yaw_rad, "label": ObjectClass.Name(b.label), "score": b.score}
                  for b in frame.boxes],
        "contributions": [{"agent_id": c.agent_id, "status": ContributionStatus.Name(c.status),
                           "sequence": str(c.sequence), "age_ms": c.age_ms, "tiles_fresh": c.tiles_fresh,
                           "tiles_substituted": c.tiles_substituted, "tiles_dropped": c.tiles_dropped}
                          for c in frame.contributions],
        "link_stats": [{"agent_id": s.agent_id, "transport": s.transport, "frames_received": str(s.frames_received),
                        "frames_refused": str(s.frames_refused), "last_sequence": str(s.last_sequence)}
                       for s in frame.link_stats],
        "stage_timings": [{"stage": s.stage, "duration_ms": s.duration_ms} for s in frame.stage_timings],
    }


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.e2e
@pytest.mark.timeout(300)
async def test_node_grpc_js_client_decodes_fused_frames(node_client: list[str], tmp_path: Path) -> None:
    fusion_config, agent_config = tmp_path / "fusion.json", tmp_path / "agent.json"
    fusion_report = tmp_path / "fusion-report.json"
    fusion_config.write_text(json.dumps(FUSION_CONFIG))
    procs: list[Proc] = []
    collector: asyncio.Task | None = None
    try:
        # The fusion node, on a free port.
        fusion = await Proc.start("fusion", _node("fusion", fusion_config, fusion_report), tmp_path)
        procs.append(fusion)
        ready = await fusion.event(time.monotonic() + START_TIMEOUT_S)
        assert ready["event"] == "ready" and ready["role"] == "fusion", ready
        address = f"127.0.0.1:{ready['port']}"

        # A plain health-check client.
        assert await asyncio.to_thread(_health, address) == {"": "SERVING", "cp.v1.Fusion": "SERVING"}

        # A Python subscriber alongside, to compare decodings of the same frames.
        python_frames: dict[int, FusedFrame] = {}
        python_arrival = asyncio.Event()
        collector = asyncio.create_task(_collect(address, python_frames, python_arrival))

        # The Node.js client.
        client = await Proc.start("node-client", [*node_client, "--address", address,
                                                  "--proto", str(protos.PROTO_PATH), "--count", str(FRAMES_WANTED),
                                                  "--timeout-s", str(READ_TIMEOUT_S + START_TIMEOUT_S)],
                                  tmp_path, cwd=CLIENT_DIR)
        procs.append(client)
        assert await client.event(time.monotonic() + 30.0) == {"event": "subscribed"}

        # One agent on a tiny live world, started on the sensor clock.
        agent_config.write_text(json.dumps({
            "agent_id": 0, "fusion": address, "source": {"kind": "world", "world": WORLD},
            "frames": WORLD["frames"], "rate_hz": 10.0, "threads": 1}))
        agent = await Proc.start("agent", _node("agent", agent_config), tmp_path)
        procs.append(agent)
        ready = await agent.event(time.monotonic() + START_TIMEOUT_S)
        assert ready["event"] == "ready" and ready["role"] == "agent" and ready["agent_id"] == 0, ready
        await agent.send(str(time.time_ns() + 200_000_000))

        # What the Node client decoded.
        deadline = time.monotonic() + READ_TIMEOUT_S
        frames: list[dict] = []
        while True:
            event = await client.event(deadline)
            if event["event"] == "done":
                break
            assert event["event"] == "frame", event
            frames.append(event)
            with (tmp_path / "node-client.jsonl").open("a") as out:  # for a look after a failure
                out.write(json.dumps(event) + "\n")
        assert event == {"event": "done", "frames": FRAMES_WANTED}
        assert await client.wait(EXIT_TIMEOUT_S) == 0, client.log_tail()

        assert len(frames) >= FRAMES_WANTED
        sequences = [int(f["sequence"]) for f in frames]
        assert all(b > a for a, b in itertools.pairwise(sequences)), sequences
        statuses = set(ContributionStatus.keys())
        labels = set(ObjectClass.keys())
        for f in frames:
            assert f["box_count"] == len(f["boxes"])
            for box in f["boxes"]:
                assert set(box) == {"x_m", "y_m", "z_m", "length_m", "width_m", "height_m", "yaw_rad", "label",
                                    "score"}
                assert all(_finite(v) for k, v in box.items() if k != "label"), box
                assert box["label"] in labels, box
                assert 0.0 <= box["score"] <= 1.0 and min(box["length_m"], box["width_m"], box["height_m"]) > 0, box
            assert all(c["status"] in statuses for c in f["contributions"]), f["contributions"]
            assert [(c["agent_id"], c["status"]) for c in f["contributions"]] == [(0, "CONTRIBUTION_STATUS_FRESH")]
            assert 0 <= int(f["contributions"][0]["sequence"]) < WORLD["frames"]
            assert f["ego_agent_id"] == 0
            assert _finite(f["latency_ms"]) and f["latency_ms"] > 0, f["latency_ms"]
            capture_ns, publish_ns = int(f["capture_time_ns"]), int(f["publish_time_ns"])
            assert capture_ns > 1_600_000_000 * 10**9 and publish_ns > capture_ns  # int64 kept whole, not a double
            assert f["latency_ms"] == pytest.approx((publish_ns - capture_ns) / 1e6, rel=1e-6)
        agent_sequences = [int(f["contributions"][0]["sequence"]) for f in frames]
        assert all(b > a for a, b in itertools.pairwise(agent_sequences)), agent_sequences

        # The same frames, as the Python subscriber decoded them.
        while sequences[-1] not in python_frames:
            python_arrival.clear()
            assert not collector.done(), f"the Python subscriber stopped: {collector.exception()!r}"
            try:
                await asyncio.wait_for(python_arrival.wait(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                pytest.fail(f"the Python subscriber did not see frame {sequences[-1]} (has {sorted(python_frames)})")
        for f in frames:
            assert int(f["sequence"]) in python_frames, (f["sequence"], sorted(python_frames))
            assert f == _expected(python_frames[int(f["sequence"])])

        # The agent finishes its frames, and the fusion node stops cleanly on SIGTERM, ending subscriptions.
        assert await agent.wait(READ_TIMEOUT_S) == 0, agent.log_tail()
        fusion.process.send_signal(signal.SIGTERM)
        assert await fusion.wait(15.0) == 0, fusion.log_tail()
        await asyncio.wait_for(collector, timeout=EXIT_TIMEOUT_S)
        report = json.loads(fusion_report.read_text())
        assert report["ticks"] >= FRAMES_WANTED
        assert report["agents"]["0"]["frames_received"] >= FRAMES_WANTED
        assert report["agents"]["0"]["frames_refused"] == 0, report
    finally:
        for proc in reversed(procs):
            await proc.stop()
        if collector is not None and not collector.done():
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)
