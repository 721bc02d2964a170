"""The ``cpstream`` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError
from rich.markup import escape

from launch import allocator, bench, chat_cmd, codec_cmd, eval_cmd, launcher, node_cmd, replay_cmd, train_cmd, world_cmd
from launch.console import console, setup_logging

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpstream", description=(
        "Collaborative perception, streamed for real. Every command has --help."))
    parser.add_argument("--debug", action="store_true", help="verbose logging and full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    world_cmd.register(sub)
    train_cmd.register(sub)
    codec_cmd.register(sub)
    eval_cmd.register(sub)
    bench.register(sub)
    launcher.register(sub)
    node_cmd.register(sub)
    replay_cmd.register(sub)
    chat_cmd.register(sub)
    return parser


def _one_line(err: BaseException) -> str:
    if isinstance(err, ValidationError):
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']} (got {e.get('input')!r})"
                    for e in err.errors()]
        return "invalid configuration: " + "; ".join(problems)
    return str(err) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    allocator.retain_freed_memory()  # every command runs frames through torch (see launch/allocator.py)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        console.print("[red]interrupted")
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's edge: one clear line instead of a traceback
        if args.debug:
            raise
        # escape: the message names files, and a path like runs/[v2]/ must not be read as markup.
        console.print(f"[red]error:[/red] {escape(_one_line(err))}", highlight=False, soft_wrap=True, emoji=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
