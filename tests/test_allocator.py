"""The allocator setting every cpstream process makes: a frame-sized block freed stays in the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# One pillar image's worth (200 x 200 x 32 float32, 5 MiB) allocated and freed; glibc's own accounting
# (mallinfo2, glibc >= 2.33) before, while held and after, in MiB: "mapped" is memory in blocks mapped
# from the kernel one by one, "kept" the free memory the heap holds for the next allocation.
BLOCK = """
import ctypes, json, torch
from launch.allocator import retain_freed_memory
state = retain_freed_memory()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
def mib():
    info = libc.mallinfo2()
    return {"mapped": info.hblkhd / 2**20, "kept": info.fordblks / 2**20}
before = mib()
block = torch.zeros(200 * 200, 32)
held = mib()
del block
print(json.dumps({"state": state, "before": before, "held": held, "after": mib()}))
"""


def _block(setting: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CPSTREAM_MALLOC"}
    if setting is not None:
        env["CPSTREAM_MALLOC"] = setting
    done = subprocess.run([sys.executable, "-c", BLOCK], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _glibc() -> bool:
    import platform

    name, version = platform.libc_ver()
    return name == "glibc" and tuple(int(p) for p in version.split(".")[:2]) >= (2, 33)


@pytest.mark.skipif(not _glibc(), reason="needs glibc >= 2.33 (mallopt and mallinfo2)")
def test_a_freed_frame_block_stays_in_the_heap():
    kept = _block(None)
    assert kept["state"] == "retain"
    # Taken from the heap, not mapped on its own (which is unmapped on free and faults in afresh) ...
    assert kept["held"]["mapped"] - kept["before"]["mapped"] < 1.0, kept
    # ... and kept there once freed, for the next frame.
    assert kept["after"]["kept"] - kept["before"]["kept"] >= 4.5, kept


@pytest.mark.skipif(not _glibc(), reason="needs glibc >= 2.33 (mallopt and mallinfo2)")
def test_the_environment_can_ask_for_the_defaults():
    default = _block("default")
    assert default["state"] == "default"
    # glibc's default maps a 5 MiB block on its own: the behaviour the setting changes.
    assert default["held"]["mapped"] - default["before"]["mapped"] >= 4.5, default
