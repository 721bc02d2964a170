"""Context-aware bitrate for a camera stream: regions that matter, their control messages, the sender's prefilter.

The server (which knows the user's question) picks the image regions that matter and sends them
to the sender as a JSON text message on the WebRTC data channel; the sender then *prefilters*
each frame before the encoder sees it: pixels inside the (slightly grown) regions pass through
untouched, everything else is blurred or downsampled. A blurred area has little high-frequency
energy, so a rate-controlled encoder (VP8 here) spends its bits inside the regions instead.

Messages (UTF-8 JSON text, one object per message)::

    {"type": "regions", "regions": [{"x": .1, "y": .2, "w": .3, "h": .2, "label": "text", "score": .9}],
     "reason": "question asks to read"}
    {"type": "rate", "fps": 2.0}

An empty ``regions`` list means "uniform again" (no prefilter). Coordinates are normalised to
the frame (0..1), so the hint survives a resolution change on the sender.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

MAX_REGIONS = 16
"""Most regions one ``regions`` message may carry; more is a malformed message."""
MAX_FPS = 120.0
"""Highest frame rate a ``rate`` message may ask for."""
OUTSIDE_MODES = ("blur", "downsample")
"""How :func:`prefilter` degrades pixels outside the regions."""
DEFAULT_STRENGTH = {"blur": 21, "downsample": 4}
"""Default ``strength`` per mode: Gaussian kernel size in pixels, or the downsampling factor."""
_EDGE_TOLERANCE = 1e-6  # float round-off when a region touches the frame edge


class ControlMessageError(ValueError):
    """A data-channel control message that cannot be used (the message names the field and value)."""


@dataclass(frozen=True, slots=True)
class Region:
    """One rectangle that matters, normalised to the frame: ``x, y`` top-left, ``w, h`` size, all in 0..1."""

    x: float
    """Left edge, share of the frame width."""
    y: float
    """Top edge, share of the frame height."""
    w: float
    """Width, share of the frame width (> 0, ``x + w <= 1``)."""
    h: float
    """Height, share of the frame height (> 0, ``y + h <= 1``)."""
    label: str
    """What the region holds (``"face"``, ``"text"``, ``"hand"``...)."""
    score: float = 1.0
    """Detector confidence in 0..1."""

    def __post_init__(self) -> None:
        for name in ("x", "y", "w", "h", "score"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Region.{name} must be a finite number, got {value!r}")
        for name in ("x", "y", "score"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Region.{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name, start in (("w", self.x), ("h", self.y)):
            size = getattr(self, name)
            if not 0.0 < size <= 1.0 or start + size > 1.0 + _EDGE_TOLERANCE:
                raise ValueError(f"Region.{name} must be > 0 and keep the region inside the frame, got {size!r}")
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"Region.label must be a non-empty string, got {self.label!r}")

    def to_dict(self) -> dict[str, float | str]:
        """The JSON object of this region."""
        return {"x": self.x, "y": self.y, "w": self.w, "h": self.h, "label": self.label, "score": self.score}

    def pixel_box(self, width: int, height: int, margin: float = 0.0) -> tuple[int, int, int, int]:
        """``x0, y0, x1, y1`` in pixels (exclusive ends), grown by ``margin`` (share of each frame side), clipped."""
        x0 = max(0, math.floor((self.x - margin) * width))
        y0 = max(0, math.floor((self.y - margin) * height))
        x1 = min(width, math.ceil((self.x + self.w + margin) * width))
        y1 = min(height, math.ceil((self.y + self.h + margin) * height))
        return x0, y0, x1, y1


@dataclass(frozen=True, slots=True)
class RegionsHint:
    """A parsed ``regions`` message: encode these regions well (none: uniform)."""

    regions: tuple[Region, ...]
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RateHint:
    """A parsed ``rate`` message: send this many frames per second."""

    fps: float


def regions_message(regions: Sequence[Region], reason: str = "") -> str:
    """The ``regions`` control message (JSON text) for ``regions``; raises on more than :data:`MAX_REGIONS`."""
    if len(regions) > MAX_REGIONS:
        raise ControlMessageError(f"regions: at most {MAX_REGIONS} allowed, got {len(regions)}")
    return json.dumps({"type": "regions", "regions": [r.to_dict() for r in regions], "reason": str(reason)})


def rate_message(fps: float) -> str:
    """The ``rate`` control message (JSON text); ``fps`` must be in (0, :data:`MAX_FPS`]."""
    return json.dumps({"type": "rate", "fps": _check_fps(fps)})


def parse_control(text: str | bytes) -> RegionsHint | RateHint:
    """Parse one data-channel control message.

    Raises:
        ControlMessageError: (a ``ValueError``) for malformed JSON, a non-object, an unknown
            ``type``, missing fields, out-of-range values or more than :data:`MAX_REGIONS` regions;
            the message names the field.
    """
    try:
        message = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:
        raise ControlMessageError(f"control message is not valid JSON: {error}") from None
    if not isinstance(message, dict):
        raise ControlMessageError(f"control message must be a JSON object, got {type(message).__name__}")
    kind = message.get("type")
    if kind == "rate":
        if "fps" not in message:
            raise ControlMessageError("rate message: missing field 'fps'")
        return RateHint(fps=_check_fps(message["fps"]))
    if kind == "regions":
        return _parse_regions(message)
    raise ControlMessageError(f"control message: unknown type {kind!r}; allowed: 'regions', 'rate'")


def _check_fps(fps: object) -> float:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0.0 < fps <= MAX_FPS:
        raise ControlMessageError(f"rate message: fps must be a number in (0, {MAX_FPS:g}], got {fps!r}")
    return float(fps)


def _parse_regions(message: dict) -> RegionsHint:
    items = message.get("regions")
    if not isinstance(items, list):
        raise ControlMessageError(f"regions message: 'regions' must be a list, got {items!r}")
    if len(items) > MAX_REGIONS:
        raise ControlMessageError(f"regions message: at most {MAX_REGIONS} regions allowed, got {len(items)}")
    reason = message.get("reason", "")
    if not isinstance(reason, str):
        raise ControlMessageError(f"regions message: 'reason' must be a string, got {reason!r}")
    regions = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ControlMessageError(f"regions[{index}] must be an object, got {item!r}")
        missing = [k for k in ("x", "y", "w", "h", "label") if k not in item]
        if missing:
            raise ControlMessageError(f"regions[{index}]: missing field(s) {', '.join(missing)}")
        try:
            regions.append(Region(item["x"], item["y"], item["w"], item["h"], item["label"], item.get("score", 1.0)))
        except ValueError as error:
            raise ControlMessageError(f"regions[{index}]: {error}") from None
    return RegionsHint(regions=tuple(regions), reason=reason)


def region_mask(shape: Sequence[int], regions: Sequence[Region], margin: float = 0.02) -> np.ndarray:
    """Boolean ``[H, W]`` mask, True inside any region grown by ``margin`` (share of each frame side).

    ``shape`` is ``(H, W)`` or an image shape ``(H, W, C)``.
    """
    if len(shape) < 2 or shape[0] <= 0 or shape[1] <= 0:
        raise ValueError(f"shape must start with a positive height and width, got {tuple(shape)!r}")
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5), got {margin!r}")
    height, width = int(shape[0]), int(shape[1])
    mask = np.zeros((height, width), dtype=bool)
    for region in regions:
        x0, y0, x1, y1 = region.pixel_box(width, height, margin)
        mask[y0:y1, x0:x1] = True
    return mask


def prefilter(image: np.ndarray, regions: Sequence[Region], *, outside: str = "blur", strength: int | None = None,
              margin: float = 0.02) -> np.ndarray:
    """Degrade everything outside ``regions`` so the encoder spends its bits inside them.

    Args:
        image: ``[H, W, 3]`` uint8 frame (any channel order).
        regions: what to keep; none returns ``image`` itself, unchanged (uniform encoding).
        outside: ``"blur"`` (Gaussian) or ``"downsample"`` (area-downsample, then bilinear back up).
        strength: Gaussian kernel size in pixels (made odd) for ``"blur"``, or the downsampling
            factor for ``"downsample"``; default :data:`DEFAULT_STRENGTH`.
        margin: grow each region by this share of the frame side, so the encoder's blocks at the
            region edge are not half blurred.

    Returns:
        A new ``[H, W, 3]`` uint8 frame whose pixels inside the grown regions equal ``image``'s exactly.
    """
    _check_image(image)
    if outside not in OUTSIDE_MODES:
        raise ValueError(f"outside must be one of {OUTSIDE_MODES}, got {outside!r}")
    strength = DEFAULT_STRENGTH[outside] if strength is None else strength
    if isinstance(strength, bool) or not isinstance(strength, (int, np.integer)) or strength < 1:
        raise ValueError(f"strength must be a positive integer, got {strength!r}")
    if not regions:
        return image
    mask = region_mask(image.shape, regions, margin)
    if mask.all():
        return image.copy()
    degraded = _degrade(image, outside, int(strength))
    degraded[mask] = image[mask]
    return degraded


def _check_image(image: object) -> None:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image must have shape [H, W, 3] with H, W > 0, got {image.shape}")


def _degrade(image: np.ndarray, outside: str, strength: int) -> np.ndarray:
    height, width = image.shape[:2]
    if outside == "blur":
        kernel = strength | 1  # GaussianBlur needs an odd size
        return cv2.GaussianBlur(image, (kernel, kernel), 0)
    small = cv2.resize(image, (max(1, width // strength), max(1, height // strength)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
