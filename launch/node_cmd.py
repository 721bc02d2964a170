"""``cpstream fusion`` and ``cpstream agent``: run one node process from a config file.

``cpstream launch`` starts these as child processes; on a field deployment each
machine runs one of them (see launch/field-fusion.yaml and launch/field-agent.yaml).
Both stop cleanly on SIGINT/SIGTERM and write their ``--report``.

Handshake with a launcher (``--handshake``): the process prints one JSON line
(``{"event": "ready", ...}``) on stdout when it is ready, and an agent then reads
the shared sensor clock's start time (nanoseconds) as one line on stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from agents.node import AgentNodeConfig, load_agent_node, write_report
from fusion.node import FusionConfig, load_fusion_node
from launch.config_files import load_config_file

REPO_ROOT = Path(__file__).resolve().parent.parent


def _announce(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _on_signals(loop: asyncio.AbstractEventLoop, stop) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


async def run_fusion(config: FusionConfig, report: Path | None, handshake: bool) -> int:
    node = load_fusion_node(config, REPO_ROOT)
    stop = asyncio.Event()
    _on_signals(asyncio.get_running_loop(), stop.set)
    server = await node.start()
    if handshake:
        _announce({"event": "ready", "role": "fusion", "port": server.port, "webrtc_port": node.webrtc_port,
                   "udp_port": node.udp_port})
    await stop.wait()
    await node.stop()
    write_report(report, node.counters())
    return 0


async def run_agent(config: AgentNodeConfig, report: Path | None, handshake: bool) -> int:
    if handshake:
        node = load_agent_node(config, REPO_ROOT)
        node.warm_up()
        await node.connect()  # ready means streaming can begin: the fusion node has accepted us
        _announce({"event": "ready", "role": "agent", "agent_id": config.agent_id})
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line.strip():
            return 0  # the launcher went away before starting us
        try:
            start_ns = int(line)
        except ValueError:
            raise ValueError(f"agent {config.agent_id}: expected the start time in nanoseconds on stdin, "
                             f"got {line.strip()[:40]!r}") from None
        node.config = config = config.model_copy(update={"start_time_ns": start_ns})
    else:
        node = load_agent_node(config, REPO_ROOT)
    _on_signals(asyncio.get_running_loop(), node.stop)
    try:
        await node.run()
    finally:
        write_report(report, node.report())
    return 0


def cmd_fusion(args: argparse.Namespace) -> int:
    config = FusionConfig.model_validate(load_config_file(args.config, args.set, section="fusion"))
    return asyncio.run(run_fusion(config, args.report, args.handshake))


def cmd_agent(args: argparse.Namespace) -> int:
    config = AgentNodeConfig.model_validate(load_config_file(args.config, args.set, section="agent"))
    return asyncio.run(run_agent(config, args.report, args.handshake))


def register(sub: argparse._SubParsersAction) -> None:
    for name, func, what in (("fusion", cmd_fusion, "the fusion node: agents stream in, fused detections out"),
                             ("agent", cmd_agent, "one agent node: sense, detect, code and stream to fusion")):
        parser = sub.add_parser(name, help=f"run {what}")
        parser.add_argument("--config", type=Path, required=True,
                            help=f"YAML or JSON with the node's settings (or a launch file's '{name}' section)")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a setting, e.g. --set listen=0.0.0.0:50051 (repeatable)")
        parser.add_argument("--report", type=Path, help="write the node's counters here on exit")
        parser.add_argument("--handshake", action="store_true", help=argparse.SUPPRESS)
        parser.set_defaults(func=func)
