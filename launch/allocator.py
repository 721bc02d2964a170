"""Keeps a process's freed memory for its next frame instead of handing it back to the kernel.

Every frame allocates and frees the same large tensors: a cloud's per-point features (50,000 points x
32 channels, 6 MB), the 200 x 200 x 32 pillar image (5 MB), the backbone's maps. With glibc's default
settings blocks that large are mapped fresh from the kernel (``mmap``) or the heap's top is returned
after they are freed (trimming), so the next frame touches new pages and faults on each 4 KiB of
them; in a virtual machine a fault is expensive. On the 2-core test machine that was a third of a
detector's time per frame (``cpstream bench models``, medians of five runs: mobiledet_tiny 63.4 ms with
the defaults, 43.9 ms with the freed memory kept; README, "Detector speed").

This is what the PyTorch CPU performance guide gets by preloading jemalloc or tcmalloc; glibc's own
``mallopt`` does it in-process, with no library to install: blocks up to ``MMAP_THRESHOLD_BYTES`` come
from the heap, and up to ``TRIM_THRESHOLD_BYTES`` of free memory at its top stay mapped. The cost is
that much resident memory the process does not give back while idle.

``CPSTREAM_MALLOC=default`` in the environment leaves glibc's defaults (for side-by-side runs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""``mallopt`` parameter numbers (glibc's malloc.h)."""
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
"""glibc's upper bound for the mmap threshold on 64-bit systems."""
TRIM_THRESHOLD_BYTES = 512 * 1024 * 1024
ENVIRONMENT = "CPSTREAM_MALLOC"


def retain_freed_memory() -> str:
    """Sets glibc's malloc to keep freed memory (see the module); returns what the allocator now does.

    Returns ``"retain"`` when both settings took, ``"default"`` when the environment asked for the
    defaults, and ``"unavailable: ..."`` (naming why) where there is no glibc ``mallopt`` (another OS or
    C library) or it refused a setting; the process then runs with its allocator as it was.
    """
    if os.environ.get(ENVIRONMENT, "retain") == "default":
        return "default"
    if not sys.platform.startswith("linux"):
        return f"unavailable: {sys.platform} has no glibc mallopt"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as err:
        return f"unavailable: {err}"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The mmap threshold first: setting it also ends glibc's dynamic adjustment of both thresholds.
    for name, parameter, value in (("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
                                   ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
        if mallopt(parameter, value) != 1:
            log.warning("mallopt(%s, %d) refused: the allocator keeps its defaults", name, value)
            return f"unavailable: mallopt({name}) refused"
    return "retain"
