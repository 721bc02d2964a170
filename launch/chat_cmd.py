"""``cpstream chat`` (the server), ``cpstream chat-send`` (a Python sender) and ``cpstream fake-llm``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from dataclasses import asdict, is_dataclass
from pathlib import Path

from launch.console import console

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    chat = sub.add_parser("chat", help="AI video chat: serve the page, take WebRTC video, ask a multimodal LLM")
    chat.add_argument("--llm-url", required=True, help="OpenAI-compatible endpoint (http://host:port[/v1])")
    chat.add_argument("--model", required=True, help="model name the endpoint serves")
    chat.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                      help="bearer token (default: $OPENAI_API_KEY)")
    chat.add_argument("--host", default="0.0.0.0")
    chat.add_argument("--port", type=int, default=8080, help="0 picks a free port (printed)")
    chat.add_argument("--sample-fps", type=float, default=2.0, help="frames per second the model reads (1-5)")
    chat.add_argument("--send-fps", type=float,
                      help="frame rate asked of senders (default: 3 per sample the model reads, 5 at least)")
    chat.add_argument("--max-age-ms", type=float, default=300.0,
                      help="a sampled frame older than this is replaced by the last good one, and marked")
    chat.add_argument("--no-regions", action="store_true", help="do not send context-aware regions to senders")
    chat.add_argument("--first-frame-timeout-s", type=float, default=10.0)
    chat.add_argument("--llm-timeout-s", type=float, default=60.0, help="longest wait for a whole answer")
    chat.add_argument("--report", type=Path, help="write the server's counters here (JSON) every second")
    chat.add_argument("--timecode", action="store_true",
                      help="frames carry their capture time (chat-send --timecode): report their age from capture")
    chat.add_argument("--samples-log", type=Path, help="append every frame sample here (JSON lines; benchmarks)")
    chat.set_defaults(func=run_chat)

    send = sub.add_parser("chat-send", help="talk to a chat server from Python: a camera, a video file or a pattern")
    send.add_argument("--server", required=True, help="the chat server, http://host:port")
    send.add_argument("--camera", default="0", help="camera index, video file, or 'pattern'")
    send.add_argument("--ask", action="append", default=[], help="a question (repeat for several)")
    send.add_argument("--ask-every-s", type=float, default=0.0, help="repeat the questions every S seconds")
    send.add_argument("--seconds", type=float, default=0.0, help="stream this long after the questions")
    send.add_argument("--fps", type=float, default=10.0, help="starting frame rate (the server may lower it)")
    send.add_argument("--timecode", action="store_true",
                      help="write each frame's capture time into its top rows (for benchmarks)")
    send.set_defaults(func=run_send)

    fake = sub.add_parser("fake-llm", help="a local OpenAI-compatible endpoint that records what it receives")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8000)
    fake.add_argument("--record", type=Path, help="append every request received here (JSON lines)")
    fake.add_argument("--delay-s", type=float, default=0.0, help="wait this long before answering (a slow model)")
    fake.add_argument("--fail-status", type=int, help="answer every request with this HTTP status")
    fake.set_defaults(func=run_fake_llm)


async def _until_stopped() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run_chat(args: argparse.Namespace) -> int:
    from fusion.chat_regions import RegionPicker
    from fusion.chat_server import ChatConfig, ChatServer
    from fusion.llm_client import LlmConfig, chat_completions_url

    chat_completions_url(args.llm_url)  # a bad URL is an error now, not at the first question
    config = ChatConfig(llm=LlmConfig(url=args.llm_url, model=args.model, api_key=args.api_key,
                                      timeout_s=args.llm_timeout_s),
                        sample_fps=args.sample_fps, max_age_ms=args.max_age_ms, regions=not args.no_regions,
                        first_frame_timeout_s=args.first_frame_timeout_s, timecode=args.timecode,
                        samples_log=args.samples_log, send_fps=args.send_fps)
    if not 0.2 <= args.sample_fps <= 15:
        raise ValueError(f"--sample-fps must be 0.2..15 (the model reads about 1-5 frames a second), got "
                         f"{args.sample_fps}")

    async def serve() -> None:
        server = ChatServer(config, region_picker=RegionPicker() if config.regions else None)
        port = await server.start(args.host, args.port)
        print(f"chat: serving on http://{args.host}:{port}/ (model {args.model} at {args.llm_url})", flush=True)

        async def report() -> None:
            while True:
                args.report.write_text(json.dumps(server.status(), indent=2))
                await asyncio.sleep(1.0)

        reporter = asyncio.ensure_future(report()) if args.report else None
        try:
            await _until_stopped()
        finally:
            if reporter is not None:
                reporter.cancel()
                args.report.write_text(json.dumps(server.status(), indent=2))
            await server.stop()

    asyncio.run(serve())
    return 0


def run_send(args: argparse.Namespace) -> int:
    from agents.chat_sender import ChatSender, FrameSource

    async def talk() -> int:
        sender = ChatSender(args.server, FrameSource(args.camera), fps=args.fps, timecode=args.timecode)
        try:
            await sender.connect()
            print(f"connected: {args.server}", flush=True)
            while True:
                for question in args.ask:
                    answer = await sender.ask(question)
                    print(f"answer: {answer}" if answer else f"error: {sender.errors[-1]}", flush=True)
                if args.ask_every_s <= 0 or not args.ask:
                    break
                await asyncio.sleep(args.ask_every_s)
            if args.seconds > 0:
                await asyncio.sleep(args.seconds)
            elif not args.ask:
                await _until_stopped()
            print("done: " + json.dumps({"frames_sent": sender.track.sent, "fps": sender.track.fps,
                                         "regions": [r.label for r in sender.track.regions],
                                         "errors": sender.errors, "server_status": sender.status}), flush=True)
        finally:
            await sender.close()
        return 0

    return asyncio.run(talk())


def run_fake_llm(args: argparse.Namespace) -> int:
    from launch.fake_llm import FakeLlm

    async def serve() -> None:
        fake = FakeLlm(delay_s=args.delay_s, fail_status=args.fail_status)
        port = await fake.start(args.host, args.port)
        print(f"fake-llm: serving on http://{args.host}:{port}/v1", flush=True)
        written = 0

        async def record() -> None:
            nonlocal written
            while True:
                await fake.wait_for_requests(written + 1, timeout_s=3600)
                with args.record.open("a") as out:
                    for request in fake.requests[written:]:
                        out.write(json.dumps(_plain(request)) + "\n")
                written = len(fake.requests)

        recorder = asyncio.ensure_future(record()) if args.record else None
        try:
            await _until_stopped()
        finally:
            if recorder is not None:
                recorder.cancel()
            await fake.stop()

    asyncio.run(serve())
    return 0


def _plain(request: object) -> dict:
    data = asdict(request) if is_dataclass(request) else dict(request)  # type: ignore[arg-type]
    data.pop("raw", None)
    return json.loads(json.dumps(data, default=str))
