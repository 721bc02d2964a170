"""`cpstream launch`: real processes (a fusion node and agents) on loopback, the report, Ctrl-C.

Each test waits on the launcher's output lines and exit, never on sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launch.config_files import ConfigFileError, apply_sets, expand_env, load_config_file

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def _launch_file(tmp_path: Path, frames: int, **extra) -> Path:
    # 5 Hz: a shared 2-core CI machine runs both agents, the fusion node and the test at once.
    doc = {"world": {"seed": 3, "agents": 2, "frames": frames}, "cache_dir": str(tmp_path / "worlds"),
           "rate_hz": 5, "fusion": {"listen": "127.0.0.1:0", "deadline_ms": 150},
           "agent_defaults": {"rate_level": 1}, "agents": "all", **extra}
    path = tmp_path / "launch.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _cpstream(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launch.cli", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_launch_runs_fusion_and_agents_as_processes_and_reports(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    process = _cpstream("launch", str(_launch_file(tmp_path, 12)), "--report", str(report))
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err[-3000:]
    result = json.loads(report.read_text())
    assert result["frames"] == 12 and result["frames_fused"] >= 8
    assert set(result["ap"]) == {"0.3", "0.5", "0.7"} and result["ap"]["0.3"] > 0.3
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
    assert set(result["bytes_per_frame"]) == {"0", "-1"}
    assert all(500 < b < 20_000 for b in result["bytes_per_frame"].values())  # coded features, not raw maps
    for agent in ("0", "-1"):
        counters = result["agents"][agent]
        assert counters["frames_sensed"] >= 8
        assert counters["fusion"]["frames_received"] == counters["uplink"]["sent"]
        assert counters["fusion"]["frames_refused"] == 0
    assert result["exit_codes"] == {"fusion": 0, "agent0": 0, "agent-1": 0}


def test_camera_agents_stream_a_crossing_to_the_fusion_node(tmp_path: Path) -> None:
    # Two pole cameras (camera-only agents) as processes, their lifted features coded and fused; MODA of people.
    doc = yaml.safe_load((ROOT / "launch" / "camera-crossing.yaml").read_text())
    doc.update({"crossing": {"seed": 2, "cameras": 2, "frames": 4}, "rate_hz": 2})
    path = tmp_path / "crossing.yaml"
    path.write_text(yaml.safe_dump(doc))
    report = tmp_path / "report.json"
    process = _cpstream("launch", str(path), "--report", str(report))
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err[-3000:]
    result = json.loads(report.read_text())
    assert result["frames_fused"] >= 3 and result["frames_scored"] == result["frames_fused"]
    assert result["moda"]["gt"] == 40 * result["frames_scored"]  # everyone on the plaza is scored
    assert result["moda"]["moda"] > 0.3  # two views of a crowd: wrong calibration or lifting scores below 0
    for agent in ("-1", "-2"):
        counters = result["agents"][agent]
        assert counters["camera_refused"] == {} and counters["frames_refused"] == 0
        assert 500 < result["bytes_per_frame"][agent] < 20_000  # coded features and the object list
        assert counters["fusion"]["frames_refused"] == 0
    assert result["exit_codes"] == {"fusion": 0, "agent-1": 0, "agent-2": 0}


def test_ctrl_c_stops_every_child_and_still_writes_the_report(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    process = _cpstream("launch", str(_launch_file(tmp_path, 60)), "--report", str(report),
                        start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        for line in process.stderr:  # the launcher says when the agents are streaming
            if line.startswith("streaming:"):
                break
            assert time.monotonic() < deadline
        else:
            pytest.fail("the launcher ended before streaming")
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in a terminal signals the whole process group
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130
    result = json.loads(report.read_text())
    assert result["interrupted"] is True
    assert set(result["exit_codes"]) == {"fusion", "agent0", "agent-1"}
    assert all(code is not None for code in result["exit_codes"].values())  # every child was reaped
    assert result["frames"] == 60 and result["frames_fused"] < 60


def test_config_files_take_the_environment_and_overrides(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CP_TEST_TOKEN", "s3cret")
    monkeypatch.setenv("CP_TEST_PORT", "50077")
    path = tmp_path / "node.yaml"
    path.write_text("fusion:\n  listen: 0.0.0.0:${CP_TEST_PORT}\n  tokens: {0: '${CP_TEST_TOKEN}'}\n"
                    "  rate_hz: ${CP_TEST_RATE:-5}\n  tls: {client_ca: '${CP_TEST_CA:-}'}\n")
    data = load_config_file(path, ["deadline_ms=80", "tokens.1=other"], section="fusion")
    assert data == {"listen": "0.0.0.0:50077", "tokens": {0: "s3cret", "1": "other"}, "rate_hz": 5,
                    "tls": {"client_ca": None}, "deadline_ms": 80}  # an empty ${VAR:-} is unset, not ""
    from fusion import FusionConfig

    assert FusionConfig.model_validate(data).tokens == {0: "s3cret", 1: "other"}
    with pytest.raises(ConfigFileError, match="CP_TEST_MISSING is not set"):
        expand_env({"token": "${CP_TEST_MISSING}"})
    with pytest.raises(ConfigFileError, match="expected KEY=VALUE"):
        apply_sets({}, ["novalue"])


@pytest.mark.parametrize("name", ["demo.yaml", "field-fusion.yaml", "field-agent.yaml", "camera-crossing.yaml"])
def test_shipped_launch_files_are_valid(name: str, monkeypatch) -> None:
    from launch.launcher import load_launch_config

    monkeypatch.setenv("CPSTREAM_FUSION_ADDRESS", "10.0.0.1:50051")
    monkeypatch.setenv("CPSTREAM_AGENT_ID", "2")
    monkeypatch.setenv("CPSTREAM_TOKEN", "t")
    monkeypatch.setenv("CPSTREAM_TOKENS", "{2: t}")
    config = load_launch_config(ROOT / "launch" / name, [])
    assert config.fusion is not None or config.agents


def test_replaying_a_scenario_folder_scores_what_eval_scores(tmp_path: Path) -> None:
    """A recorded drive in the OPV2V layout through agent processes and a fusion node, at its
    recorded rate: the fused AP equals `cpstream eval` of the same folder through the same codec."""
    world = subprocess.run([sys.executable, "-m", "launch.cli", "world", "generate", "--out", str(tmp_path),
                            "--seed", "4", "--agents", "2", "--frames", "10", "--cameras", "0"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert world.returncode == 0, world.stderr[-2000:]
    folder = tmp_path / "synthetic_seed4"
    report, evaluated = tmp_path / "replay.json", tmp_path / "eval.json"
    patient = tmp_path / "fusion.yaml"  # a busy CI machine must not turn a slow frame into a stale one
    patient.write_text("fusion: {deadline_ms: 5000}\n")
    # At 2 Hz an agent on a loaded 2-core machine computes every frame in its slot instead of skipping
    # to the newest (which live streaming does by design, and which would fuse other frames than eval).
    replay = _cpstream("replay", str(folder), "--report", str(report), "--fusion-config", str(patient),
                       "--rate-hz", "2")
    _, err = replay.communicate(timeout=240)
    assert replay.returncode == 0, err[-3000:]
    run = subprocess.run([sys.executable, "-m", "launch.cli", "eval", "--data", str(folder), "--fusion",
                          "intermediate", "--rate-level", "0", "--precision", "auto", "--json", str(evaluated)],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)  # the nodes' default precision
    assert run.returncode == 0, run.stderr[-2000:]
    streamed, offline = json.loads(report.read_text()), json.loads(evaluated.read_text())
    assert streamed["frames_scored"] == offline["frames"] == 10, streamed
    assert streamed["ap"] == offline["ap"], streamed


def test_replay_refuses_a_rate_for_a_recording(tmp_path: Path, capsys) -> None:
    from launch.cli import main

    assert main(["replay", str(tmp_path / "session.mcap"), "--rate-hz", "2"]) == 2
    assert "--rate-hz is for a scenario folder" in capsys.readouterr().err


def test_ground_truth_is_cached_with_the_rendered_world(tmp_path: Path, monkeypatch) -> None:
    """The second launch of a world reads its ground truth back instead of placing it again."""
    import numpy as np

    from agents import WorldConfig
    from launch import launcher
    from models.detector import DetectorConfig

    config = launcher.LaunchConfig.model_validate(
        {"world": WorldConfig(seed=3, agents=2, frames=3, camera={"count": 0}).model_dump(),
         "cache_dir": str(tmp_path / "worlds")})
    folder = launcher.world_folder(config)
    detector = DetectorConfig()
    first = launcher.ground_truth(folder, None, 3, detector, cache=folder.parent)
    assert len(list(folder.parent.glob("ground-truth-*.npz"))) == 1

    def placed_again(*args):
        raise AssertionError("placed again")

    monkeypatch.setattr(launcher, "coop_sample", placed_again)
    again = launcher.ground_truth(folder, None, 2, detector, cache=folder.parent)
    assert len(again.boxes) == 2
    for k in range(2):
        assert np.array_equal(again.boxes[k], first.boxes[k])
        assert np.array_equal(again.world_from_ego[k], first.world_from_ego[k])
    other = detector.model_copy(update={"grid": detector.grid.model_copy(update={"cell_size_m": 0.4})})
    with pytest.raises(AssertionError, match="placed again"):  # another grid: another cache entry
        launcher.ground_truth(folder, None, 2, other, cache=folder.parent)
    with pytest.raises(AssertionError, match="placed again"):  # more frames than were cached
        launcher.ground_truth(folder, None, 3 + 1, detector, cache=folder.parent)
