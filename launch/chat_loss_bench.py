"""``cpstream bench chat``: what the model reads of a video chat under real UDP loss, and the bitrate that
context-aware encoding saves.

Loss: per level, a fresh pair of network namespaces (``transport.impair``): the chat server and a fake LLM in the
hub, a Python sender (``cpstream chat-send --camera pattern --timecode``: a moving test pattern with its capture
time written into its top rows) in the remote namespace, streaming VP8 over WebRTC. Once the server decodes frames,
nftables drops ``N`` % of the packets on the link both ways, and the server's sampler (the frames the model reads,
``--sample-fps`` a second) is logged for ``--seconds``. Per level: samples per second and fresh ones per second
(a new frame: the rest are the last good frame again, substituted and marked), the share substituted, the age of
what the model reads from capture (p50/p99, substituted samples included: their age grows), frames decoded per
second, and the real drop share from the nftables counters. Sender and server share this machine's clock.

Bitrate: :func:`launch.chat_bench.bitrate_bench` (see there) on ``--video FILE`` (its first ``--frames``, 150 by
default) or the synthetic clip of ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fusion.chat_frames import percentiles
from launch.console import console
from transport.impair import NetnsTopology, impairment_unavailable

REPO_ROOT = Path(__file__).resolve().parent.parent
CONNECT_TIMEOUT_S = 60.0
WARMUP_S = 1.0
"""Seconds after the loss goes on before samples count (the jitter buffer settles into the new regime)."""


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _level(loss_pct: float, args: argparse.Namespace, work: Path) -> dict:
    name = f"loss{loss_pct:g}"
    samples_log, record = work / f"{name}-samples.jsonl", work / f"{name}-llm.jsonl"
    cpstream = [sys.executable, "-m", "launch.cli"]
    processes: list[subprocess.Popen] = []
    with NetnsTopology(1, prefix="cpcb", subnet=207) as net:
        url = f"http://{net.hub_address(0)}:8080"

        def start(namespace: str, argv: list[str], log_name: str) -> subprocess.Popen:
            process = subprocess.Popen(net.exec_prefix(namespace) + cpstream + argv, cwd=REPO_ROOT,
                                       stdout=(work / f"{name}-{log_name}.out").open("w"), stderr=subprocess.STDOUT)
            processes.append(process)
            return process

        try:
            start(net.hub, ["fake-llm", "--port", "8000", "--record", str(record)], "llm")
            start(net.hub, ["chat", "--llm-url", "http://127.0.0.1:8000/v1", "--model", "fake", "--host",
                            net.hub_address(0), "--port", "8080", "--timecode", "--samples-log", str(samples_log),
                            "--sample-fps", str(args.sample_fps), "--max-age-ms", str(args.max_age_ms_chat)]
                           + (["--send-fps", str(args.send_fps)] if args.send_fps else []), "chat")
            time.sleep(2.0)  # the server binds its port (the sender retries below until it does)
            sender = None
            deadline = time.monotonic() + CONNECT_TIMEOUT_S
            while time.monotonic() < deadline:
                if sender is None or sender.poll() is not None:
                    sender = start(net.remote(0), ["chat-send", "--server", url, "--camera", "pattern",
                                                   "--timecode", "--seconds", "3600"], "send")
                if samples_log.exists() and samples_log.stat().st_size > 0:
                    break
                time.sleep(0.2)
            else:
                raise RuntimeError(f"loss {loss_pct:g} %: the server decoded no frame within {CONNECT_TIMEOUT_S:.0f} s"
                                   f"; see {work}")
            if loss_pct > 0:
                net.set_loss(loss_pct, protocol="udp")
            started_ns = time.time_ns()
            time.sleep(args.seconds + WARMUP_S)
            ended_ns = time.time_ns()
            counters = net.loss_counters()
        finally:
            for process in reversed(processes):
                _stop(process)
    rows = [json.loads(line) for line in samples_log.read_text().splitlines()]
    window = [r for r in rows if started_ns + WARMUP_S * 1e9 <= r["time_ns"] <= ended_ns]
    seconds = (ended_ns - started_ns) / 1e9 - WARMUP_S
    fresh = [r for r in window if not r["substituted"]]
    ages = [r["capture_age_ms"] for r in window if r["capture_age_ms"] is not None]
    fresh_ages = [r["capture_age_ms"] for r in fresh if r["capture_age_ms"] is not None]
    decoded = (window[-1]["frames_decoded"] - window[0]["frames_decoded"]) / seconds if len(window) > 1 else 0.0
    up, down = counters.get("r0->hub", {}), counters.get("hub->r0", {})
    seen = up.get("seen", 0) + down.get("seen", 0)
    return {"loss_pct": loss_pct, "seconds": round(seconds, 1), "samples_per_s": round(len(window) / seconds, 2),
            "fresh_per_s": round(len(fresh) / seconds, 2),
            "substituted_share": round(1 - len(fresh) / len(window), 3) if window else None,
            "age_ms": percentiles(ages), "fresh_age_ms": percentiles(fresh_ages),
            "unread_timecodes": len(window) - len(ages), "decoded_fps": round(decoded, 2),
            "measured_drop_share": round((up.get("dropped", 0) + down.get("dropped", 0)) / seen, 3) if seen else 0.0}


def bench_chat(args: argparse.Namespace) -> dict:
    out: dict = {}
    losses = [float(x) for x in args.chat_losses.split(",") if x.strip()]
    if losses:
        reason = impairment_unavailable()
        if reason is not None:
            raise RuntimeError(f"bench chat needs network namespaces and nftables for real loss: {reason} "
                               f"(--chat-losses '' runs the bitrate part only)")
        runs = []
        with tempfile.TemporaryDirectory(prefix="cpstream-chat-") as tmp:
            for loss in losses:
                console.print(f"[bold]loss {loss:g} %[/bold] ...", highlight=False)
                run = _level(loss, args, Path(tmp))
                runs.append(run)
                console.print(f"  fresh {run['fresh_per_s']}/s of {run['samples_per_s']}/s  substituted "
                              f"{run['substituted_share']}  age p50/p99 {run['age_ms']['p50']}/{run['age_ms']['p99']}"
                              f" ms  decoded {run['decoded_fps']} fps  dropped {run['measured_drop_share']}",
                              highlight=False)
        out["loss"] = {"sample_fps": args.sample_fps, "send_fps": args.send_fps, "max_age_ms": args.max_age_ms_chat, "runs": runs}
    if not args.no_bitrate:
        from launch.chat_bench import bitrate_bench, read_video

        clip = f"the video {args.video}" if args.video else f"the synthetic clip, seed {args.seed or 0}"
        console.print(f"[bold]bitrate[/bold]: uniform against context-aware encoding of {clip} ...", highlight=False)
        frames = read_video(str(args.video), args.frames or 150) if args.video else None
        out["bitrate"] = {"clip": clip, **bitrate_bench(frames, seed=args.seed or 0)}
    return out
