"""Regenerate the Python code for ``protos/cpstream.proto``.

Run from anywhere::

    python -m protos.generate            # rewrite the committed files in protos/
    python -m protos.generate --out DIR  # write DIR/protos/cpstream_pb2*.py(i)

The proto is compiled with ``DIR`` as the only project include root, so the
generated modules import each other as ``from protos import cpstream_pb2``.
The generated files are committed; ``tests/test_protos.py`` checks that they
match what this module produces.
"""

from __future__ import annotations

import argparse
import importlib.resources
import shutil
from collections.abc import Sequence
from pathlib import Path

from grpc_tools import protoc

PROTO_NAME = "cpstream.proto"
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
GENERATED_NAMES = ("cpstream_pb2.py", "cpstream_pb2.pyi", "cpstream_pb2_grpc.py")


class GenerationError(RuntimeError):
    """protoc rejected the proto or could not write its output."""


def generate(out_root: Path = REPO_ROOT) -> list[Path]:
    """Compile the proto into ``out_root/protos/``.

    When ``out_root`` is not the repository root, the proto is first copied to
    ``out_root/protos/cpstream.proto`` so that the include layout (and with it
    the generated imports and embedded descriptor) is the same.

    Args:
        out_root: Directory that plays the role of the repository root.

    Returns:
        Paths of the generated files.

    Raises:
        GenerationError: protoc failed.
    """
    out_root = out_root.resolve()
    proto = out_root / "protos" / PROTO_NAME
    source = PACKAGE_DIR / PROTO_NAME
    if proto != source:
        proto.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, proto)
    # grpc_tools bundles the well-known types (google/protobuf/*.proto).
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{out_root}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(proto),
    ]
    status = protoc.main(args)
    if status != 0:
        raise GenerationError(f"protoc exited with status {status} for {proto}")
    return [proto.parent / name for name in GENERATED_NAMES]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m protos.generate", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT,
        help="root to write protos/cpstream_pb2*.py(i) under (default: the repository root)",
    )
    args = parser.parse_args(argv)
    try:
        generate(args.out)
    except GenerationError as error:
        parser.exit(1, f"error: {error}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
