"""A capture time written into a video frame's pixels, so a receiver can tell how old a decoded frame is.

RTP timestamps start at a random origin and a browser's are its own, so a benchmark that wants the age of
a frame from capture to the model stamps it into the picture: 48 bits of milliseconds (wall clock) as a row of
black and white blocks across the top of the frame, big enough to survive VP8 at any bitrate we use. Sender and
receiver must share a clock (the benchmarks run both on one machine, in network namespaces).
"""

from __future__ import annotations

import numpy as np

BITS = 48
BLOCK_PX = 8
GUARD_BITS = (1, 0)
"""A white then a black block before the data: a frame without them holds no timecode."""


def _check(image: np.ndarray) -> None:
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
        raise ValueError(f"a timecode needs an H×W×3 uint8 image, got {getattr(image, 'shape', type(image))}")
    if image.shape[1] < (BITS + len(GUARD_BITS)) * BLOCK_PX or image.shape[0] < BLOCK_PX:
        raise ValueError(f"a timecode needs an image at least {(BITS + len(GUARD_BITS)) * BLOCK_PX} px wide and "
                         f"{BLOCK_PX} px high, got {image.shape[1]}×{image.shape[0]}")


def stamp(image: np.ndarray, time_ns: int) -> np.ndarray:
    """``image`` with ``time_ns`` (to the millisecond) written across its top-left blocks (in place; returned)."""
    _check(image)
    millis = (time_ns // 1_000_000) % (1 << BITS)
    bits = list(GUARD_BITS) + [(millis >> (BITS - 1 - k)) & 1 for k in range(BITS)]
    for k, bit in enumerate(bits):
        image[:BLOCK_PX, k * BLOCK_PX:(k + 1) * BLOCK_PX] = 255 if bit else 0
    return image


def read(image: np.ndarray) -> int | None:
    """The time stamped into ``image`` (ns, to the millisecond), or ``None`` when it carries no timecode."""
    _check(image)
    inner = slice(2, BLOCK_PX - 2)  # block centres: the edges blur under the codec
    count = BITS + len(GUARD_BITS)
    strip = image[inner, :count * BLOCK_PX].astype(np.float32).mean(axis=(0, 2))
    levels = strip.reshape(count, BLOCK_PX)[:, 2:BLOCK_PX - 2].mean(axis=1)
    bits = [int(level > 127.5) for level in levels]
    if tuple(bits[:len(GUARD_BITS)]) != GUARD_BITS or np.any(np.abs(levels - 127.5) < 40):
        return None  # no guard, or a block too grey to read
    millis = 0
    for bit in bits[len(GUARD_BITS):]:
        millis = (millis << 1) | bit
    return millis * 1_000_000
