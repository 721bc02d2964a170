"""``cpstream bench loss``: intermediate-fusion AP and latency under real packet loss and bandwidth caps.

The fusion node runs on the ego vehicle: a network namespace (the *hub*) holds the launcher, the
fusion node and the ego agent, which reaches the node over a local gRPC link without crossing a radio. Every other agent
runs in its own namespace, joined to the hub by its own veth pair (``transport.impair``), so
loss and caps are per agent link, as with one radio per vehicle. Each run is a real
``cpstream launch`` of the held-out world; loss is switched on (nftables, random drop of every
packet on the link, both ways) once every agent is connected, before the first frame.

Modes:

- ``substitution``: WebRTC data channel (unordered, no retransmission), frames in
  self-contained chunks; missing tiles and frames substituted from earlier ones.
- ``no_substitution``: the same link; what did not arrive is left out (missing = ego only).
- ``grpc_tcp``: gRPC over TCP on the same impaired link (retransmission; no loss reaches the
  receiver, delay does).
- ``datagram``: the same chunks as ``substitution`` in plain UDP datagrams (``transport.datagram_link``:
  sequence numbers and send times, no retransmission, no congestion control), with substitution.

Per setting (medians over ``--repeats`` runs, every run kept under ``trials``): AP@0.5/0.7 of the fused frames against the world's ground truth; ``latency_ms`` capture
to fused output (p50, p99); ``remote_age_ms`` the age at fusion of the newest evidence used from
the remote agents (p50, p99: how stale the other vehicles' view is); ``substituted_share`` the
share of the remote agents' tiles that were substituted; the real drop share from the nftables
counters. ``--caps`` adds runs under a per-agent bandwidth cap (``tc tbf``), with the senders'
rate control on and off, over the link ``--cap-mode`` names.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from agents import SyntheticWorld
from launch.console import console
from launch.datasets import HELD_OUT_SEED
from launch.world_cmd import world_config
from transport.impair import NetnsTopology, impairment_unavailable

REPO_ROOT = Path(__file__).resolve().parent.parent
MODES = ("substitution", "no_substitution", "grpc_tcp", "datagram")
TRANSPORTS = {"substitution": "webrtc", "no_substitution": "webrtc", "grpc_tcp": "grpc", "datagram": "udp"}
RUN_TIMEOUT_S = 300


def _launch_config(args: argparse.Namespace, world: dict, net: NetnsTopology, ego: int, remotes: list[int],
                   mode: str, rate_control: bool) -> dict:
    transport = TRANSPORTS[mode]
    fusion = {"listen": "0.0.0.0:0", "detector": "models/checkpoints/mobiledet_tiny.pt",
              "codec": "models/checkpoints/codec_mobiledet_tiny.pt", "deadline_ms": args.deadline_ms,
              "max_age_ms": args.max_age_ms, "threads": 1, "precision": "auto",
              "substitute": mode != "no_substitution"}
    if transport == "webrtc":
        fusion["webrtc_listen"] = "0.0.0.0:0"
    if transport == "udp":
        fusion["udp_listen"] = "0.0.0.0:0"
    agent = {"detector": "models/checkpoints/mobiledet_tiny.pt", "codec": "models/checkpoints/codec_mobiledet_tiny.pt",
             "rate_level": args.rate_level, "threads": 1, "precision": "auto",
             "transport": transport, "rate_control": {"enabled": rate_control}}
    # The ego's agent runs beside the fusion node in the same vehicle: a local gRPC link in every mode.
    agents = [{"agent_id": ego, "transport": "grpc", "rate_control": {"enabled": False}, "rate_level": args.rate_level},
              *({"agent_id": a} for a in remotes)]
    return {"world": world, "rate_hz": getattr(args, "rate_hz", 10.0), "agent_niceness": 5, "fusion": fusion,
            "agent_defaults": agent,
            "agents": agents, "agent_netns": {str(a): net.remote(k) for k, a in enumerate(remotes)},
            "agent_fusion_host": {str(ego): net.hub_address(0),
                                  **{str(a): net.hub_address(k) for k, a in enumerate(remotes)}}}


def _run(config: dict, net: NetnsTopology, loss_pct: float, cap: str | None, work: Path, name: str) -> dict:
    """One launch in the hub namespace; the impairment goes on once every agent is connected."""
    config_path, report_path = work / f"{name}.json", work / f"{name}-report.json"
    config_path.write_text(json.dumps(config))
    command = [*net.exec_prefix(net.hub), sys.executable, "-m", "launch.cli", "launch", str(config_path),
               "--report", str(report_path)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    impaired, timed_out, tail = False, False, []
    started = time.monotonic()
    try:
        for line in process.stdout:  # the launcher's own lines: "streaming: ..." once every agent is connected
            tail = (tail + [line.rstrip()])[-30:]
            if not impaired and line.startswith("streaming:"):
                if loss_pct > 0:
                    net.set_loss(loss_pct)
                if cap:
                    net.cap_bandwidth(cap)
                impaired = True
            if time.monotonic() - started > RUN_TIMEOUT_S:
                timed_out = True
                break
        code = None if timed_out else process.wait(timeout=30)
    finally:
        _end(process)
        counters = net.loss_counters()
        net.clear()
    if code != 0 or not report_path.exists():
        why = f"took longer than {RUN_TIMEOUT_S} s" if timed_out else f"exit {code}"
        raise RuntimeError(f"run {name} failed ({why}); last output:\n" + "\n".join(tail))
    report = json.loads(report_path.read_text())
    timeline = [json.loads(line) for line in report_path.with_suffix(".frames.jsonl").read_text().splitlines()]
    return {"report": report, "timeline": timeline, "counters": counters}


def _end(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Stops a launcher still running with SIGTERM, on which it stops its fusion and agent processes and
    writes its report (a SIGKILL would leave them running); SIGKILL only after ``grace_s``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _summarise(result: dict, remotes: list[int]) -> dict:
    report, timeline = result["report"], result["timeline"]
    ages, tiles, substituted, statuses = [], 0, 0, {}
    for frame in timeline:
        for agent, entry in frame["agents"].items():
            if int(agent) not in remotes:
                continue
            status, age, fresh, subst, dropped = entry[:5]
            statuses[status] = statuses.get(status, 0) + 1
            if status != "MISSING":
                ages.append(age)
                tiles += fresh + subst + dropped
                substituted += subst
    seen = sum(c["seen"] for c in result["counters"].values())
    dropped = sum(c["dropped"] for c in result["counters"].values())
    lat = report["latency_ms"]
    return {
        "ap": {k: report["ap"].get(k) for k in ("0.3", "0.5", "0.7")},
        "latency_ms": {"p50": lat["p50"], "p99": lat["p99"]},
        "remote_age_ms": {"p50": _pct(ages, 50), "p99": _pct(ages, 99)},
        "substituted_share": round(substituted / tiles, 4) if tiles else 0.0,
        "remote_statuses": statuses,
        "frames_fused": report["frames_fused"],
        "stage_ms": report.get("stage_ms"),
        "measured_drop_share": round(dropped / seen, 4) if seen else 0.0,
        "bytes_per_frame": report["bytes_per_frame"],
        "agents": {a: {"compute_ms": v.get("compute_ms"), "frames_skipped": v.get("frames_skipped"),
                       "fusion": v.get("fusion", {}), "uplink": v.get("uplink", {}),
                       "rate_control": v.get("rate_control", {}), "frames_rate_skipped": v.get("frames_rate_skipped")}
                   for a, v in report["agents"].items()},
    }


def _median(trials: list[dict]) -> dict:
    """Medians over repeated runs of one setting (AP, latency, age, shares); every run is kept under ``trials``."""
    def med(get):
        values = [v for v in (get(t) for t in trials) if v is not None]
        return round(float(np.median(values)), 4) if values else None

    out = {"ap": {k: med(lambda t, k=k: t["ap"][k]) for k in ("0.3", "0.5", "0.7")},
           "latency_ms": {k: med(lambda t, k=k: t["latency_ms"][k]) for k in ("p50", "p99")},
           "remote_age_ms": {k: med(lambda t, k=k: t["remote_age_ms"][k]) for k in ("p50", "p99")},
           "substituted_share": med(lambda t: t["substituted_share"]),
           "measured_drop_share": med(lambda t: t["measured_drop_share"]),
           "repeats": len(trials), "trials": trials}
    return out


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


DEFAULT_AGENTS = 2
DEFAULT_FRAMES = 150


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # so that the namespaces are deleted on SIGTERM too


def bench_loss(args: argparse.Namespace) -> dict:
    signal.signal(signal.SIGTERM, _interrupt)
    reason = impairment_unavailable()
    if reason is not None:
        raise RuntimeError(f"bench loss needs real network impairment (root, ip, nft, tc): {reason}")
    config = world_config(args)
    # Defaults: 2 agents (the ego and one roadside unit behind the impaired link), 150 frames, which a
    # 2-core machine holds at the default 5 Hz; --agents 3 --rate-hz 10 wants a faster one (README).
    updates = {"seed": HELD_OUT_SEED if args.seed is None else args.seed, "frames": args.frames or DEFAULT_FRAMES,
               "agents": args.agents or DEFAULT_AGENTS, "camera": config.camera.model_copy(update={"count": 0})}
    world = config.model_copy(update=updates)
    ids = list(SyntheticWorld(world).agent_ids)
    ego = min(a for a in ids if a >= 0)
    remotes = [a for a in ids if a != ego]
    world_json = {"seed": world.seed, "agents": world.agents, "frames": world.frames}
    losses = [float(x) for x in args.losses.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(sorted(unknown))}; expected {', '.join(MODES)}")
    caps = [c.strip() for c in args.caps.split(",") if c.strip()]
    repeats = max(1, args.repeats)
    trials: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="cpstream-loss-") as tmp, NetnsTopology(len(remotes), prefix="cpl") as net:
        work = Path(tmp)
        for repeat in range(repeats):  # repeats outermost: a noisy minute on the machine hits every setting alike
            for loss in losses:
                for mode in modes:
                    name = f"{mode}-{loss:g}-{repeat}"
                    console.print(f"[bold]loss {loss:g} %[/bold], {mode} (run {repeat + 1}/{repeats}) ...",
                                  highlight=False)
                    result = _run(_launch_config(args, world_json, net, ego, remotes, mode, False), net, loss, None,
                                  work, name)
                    r = _summarise(result, remotes)
                    trials.setdefault(("loss", loss, mode), []).append(r)
                    console.print(f"  AP@0.5 {r['ap']['0.5']}  p99 {r['latency_ms']['p99']} ms  remote age p99 "
                                  f"{r['remote_age_ms']['p99']} ms  substituted {r['substituted_share']:.3f}  "
                                  f"dropped {r['measured_drop_share']:.3f}", highlight=False)
            for cap in caps:
                for rate_control in (True, False):
                    name = f"cap-{cap}-{'adaptive' if rate_control else 'fixed'}-{repeat}"
                    console.print(f"[bold]cap {cap} per agent[/bold], rate control {'on' if rate_control else 'off'} "
                                  f"(run {repeat + 1}/{repeats}) ...", highlight=False)
                    cfg = _launch_config(args, world_json, net, ego, remotes, args.cap_mode, rate_control)
                    if not rate_control:
                        cfg["agent_defaults"]["rate_level"] = args.cap_fixed_level
                    r = _summarise(_run(cfg, net, 0.0, cap, work, name), remotes)
                    trials.setdefault(("cap", cap, rate_control), []).append(r)
                    console.print(f"  AP@0.5 {r['ap']['0.5']}  p99 {r['latency_ms']['p99']} ms  remote age p99 "
                                  f"{r['remote_age_ms']['p99']} ms  bytes/frame {r['bytes_per_frame']}", highlight=False)
    runs = [{"loss_pct": loss, "mode": mode, **_median(trials[("loss", loss, mode)])}
            for loss in losses for mode in modes]
    cap_runs = [{"cap": cap, "rate_control": rc, **_median(trials[("cap", cap, rc)])}
                for cap in caps for rc in (True, False)]
    out = {"world": {**world_json, "ego": ego, "remotes": remotes}, "rate_hz": args.rate_hz,
           "deadline_ms": args.deadline_ms, "cap_mode": args.cap_mode,
           "max_age_ms": args.max_age_ms, "runs": runs, "cap_runs": cap_runs}
    if args.plot is not None:
        _plot(out, args.plot)
    return out


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ap, ax_lat, ax_age) = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode in MODES:
        runs = [r for r in out["runs"] if r["mode"] == mode]
        if not runs:
            continue
        x = [r["loss_pct"] for r in runs]
        ax_ap.plot(x, [r["ap"]["0.5"] for r in runs], marker="o", label=mode)
        ax_lat.plot(x, [r["latency_ms"]["p99"] for r in runs], marker="o", label=mode)
        ax_age.plot(x, [r["remote_age_ms"]["p99"] for r in runs], marker="o", label=mode)
    ax_ap.set(xlabel="UDP/TCP packet loss on each remote link (%)", ylabel="AP@0.5", title="fused AP")
    ax_lat.set(xlabel="packet loss (%)", ylabel="ms", title="capture -> fused output, p99")
    ax_age.set(xlabel="packet loss (%)", ylabel="ms", title="age of remote evidence at fusion, p99")
    for ax in (ax_ap, ax_lat, ax_age):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
