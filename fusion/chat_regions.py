"""Which parts of a camera frame matter for the user's question: light CPU detectors, chosen by keywords.

:class:`RegionPicker` is the server side of context-aware bitrate (see ``transport.video_regions``):
it looks at a sampled frame and the current question and returns the regions the sender should
encode well. The detectors are deliberately cheap and classical, and they are heuristics:

- **faces**: OpenCV's Haar frontal-face cascade; **people**: a head-and-shoulders box
  extrapolated from each face (a chat camera rarely sees a whole body, which HOG would need).
- **text**: morphological gradient, Otsu threshold, horizontal closing, connected components
  kept when they are wide, short and dense in edges (printed lines, signs, labels). Busy
  textures can pass as text; plain walls never do.
- **hands / held objects**: skin-coloured blobs (YCrCb range) that are not a detected face,
  grown generously because what a hand holds sits around it. Skin-coloured walls fool it.

The frame is downscaled to ``work_width`` first; a 640x480 frame takes a few milliseconds.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import cv2
import numpy as np

from transport.video_regions import Region

logger = logging.getLogger(__name__)

KIND_WORDS = {
    "text": {"read", "text", "sign", "written", "write", "label", "says", "say", "word", "words", "title", "menu",
             "letter", "letters", "number", "card", "page", "screen"},
    "faces": {"who", "face", "person", "people", "wearing", "expression", "look", "looks", "smile", "hair", "me",
              "he", "she", "they"},
    "hands": {"hold", "holding", "held", "hand", "hands", "this", "object", "thing", "item", "showing", "show"},
}
"""Question words that make a kind of region matter ("faces" covers faces and people)."""
DEFAULT_KINDS = ("faces", "hands")
"""Kinds used when neither the question nor the history names one: faces, people and held objects."""
CENTER = Region(0.2, 0.15, 0.6, 0.7, "center", 0.0)
"""The fallback when no detector finds anything of the kinds asked for."""


@dataclass(frozen=True)
class PickerConfig:
    """Tuning of :class:`RegionPicker`."""

    work_width: int = 320
    """Frames are downscaled to this width before any detector runs."""
    max_regions: int = 6
    """Most regions returned (highest score first)."""
    min_face_px: int = 28
    """Smallest face side at work scale."""
    min_text_height_px: int = 5
    """Smallest text line height at work scale."""
    min_skin_share: float = 0.004
    """Smallest skin blob, as a share of the frame area."""
    hand_grow: float = 0.6
    """Hand boxes grow by this share of their size on each side, to take in what they hold."""


class RegionPicker:
    """Chooses regions for a question. Stateless between calls; one instance may serve many streams."""

    def __init__(self, config: PickerConfig | None = None) -> None:
        self.config = config or PickerConfig()
        self._faces = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        if self._faces.empty():
            raise RuntimeError("OpenCV's Haar face cascade is missing (needs opencv-python-headless < 5)")

    def pick(self, image_rgb: np.ndarray, question: str, history_text: str = "") -> tuple[list[Region], str]:
        """Regions that matter for ``question`` in ``image_rgb`` (``[H, W, 3]`` uint8 RGB), and a short reason.

        The kinds come from the question's words, else from ``history_text``'s, else
        :data:`DEFAULT_KINDS`. Overlapping boxes are merged; at most ``max_regions`` are returned.
        With nothing found, the reason says so and the single region is :data:`CENTER`.
        """
        if not isinstance(image_rgb, np.ndarray) or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
            raise ValueError(f"image_rgb must be an [H, W, 3] array, got {getattr(image_rgb, 'shape', image_rgb)!r}")
        kinds, why = _kinds_for(question, history_text)
        small = _downscale(image_rgb, self.config.work_width)
        height, width = small.shape[:2]
        faces = self._detect_faces(small) if ("faces" in kinds or "hands" in kinds) else []
        boxes: list[tuple[float, float, float, float, str, float]] = []  # x0, y0, x1, y1 (pixels), label, score
        if "faces" in kinds:
            boxes += faces + [_person_box(f, width, height) for f in faces]
        if "text" in kinds:
            boxes += _detect_text(small, self.config.min_text_height_px)
        if "hands" in kinds:
            boxes += _detect_hands(small, faces, self.config)
        boxes = _merge(boxes)
        boxes.sort(key=lambda b: (b[5], (b[2] - b[0]) * (b[3] - b[1])), reverse=True)
        regions = [_to_region(b, width, height) for b in boxes[: self.config.max_regions]]
        if not regions:
            return [CENTER], f"no {'/'.join(kinds)} found ({why}); central region"
        found = ", ".join(sorted({r.label for r in regions}))
        return regions, f"{found} ({why})"

    def _detect_faces(self, small: np.ndarray) -> list[tuple[float, float, float, float, str, float]]:
        gray = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY))
        side = self.config.min_face_px
        found = self._faces.detectMultiScale(gray, scaleFactor=1.2, minNeighbors=4, minSize=(side, side))
        return [(float(x), float(y), float(x + w), float(y + h), "face", 0.9) for x, y, w, h in found]


def _kinds_for(question: str, history_text: str) -> tuple[tuple[str, ...], str]:
    for source, text in (("question", question), ("history", history_text)):
        words = set(re.findall(r"[a-z]+", text.lower()))
        kinds = tuple(k for k, vocabulary in KIND_WORDS.items() if words & vocabulary)
        if kinds:
            hits = sorted(words & set().union(*(KIND_WORDS[k] for k in kinds)))
            return kinds, f"{source} mentions {', '.join(repr(w) for w in hits[:3])}"
    return DEFAULT_KINDS, "no kind named; faces, people and held objects"


def _downscale(image: np.ndarray, work_width: int) -> np.ndarray:
    height, width = image.shape[:2]
    if width <= work_width:
        return image
    size = (work_width, max(1, round(height * work_width / width)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _person_box(face: tuple, width: int, height: int) -> tuple[float, float, float, float, str, float]:
    """Head and shoulders below a face: 3 face widths wide, down to 2.5 face heights under its top."""
    x0, y0, x1, y1 = face[:4]
    side = x1 - x0
    return (max(0.0, x0 - side), max(0.0, y0 - 0.3 * side), min(width, x1 + side), min(height, y0 + 2.5 * side),
            "person", 0.6)


def _detect_text(small: np.ndarray, min_height: int) -> list[tuple[float, float, float, float, str, float]]:
    """Printed lines: thin dark-on-light or light-on-dark strokes (black/top hat) with dense horizontal gradient."""
    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    stroke_kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (13, 7))
    strokes = np.maximum(cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, stroke_kernel),
                         cv2.morphologyEx(gray, cv2.MORPH_TOPHAT, stroke_kernel))
    gradient = cv2.convertScaleAbs(cv2.Sobel(strokes, cv2.CV_16S, 1, 0, ksize=3))
    # Weak strokes are texture, not print: Otsu alone would split a flat, low-contrast image anywhere.
    _, edges = cv2.threshold(gradient, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    edges[gradient < 80] = 0
    lines = cv2.morphologyEx(edges, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (9, 3)))
    count, _, stats, _ = cv2.connectedComponentsWithStats(lines, connectivity=8)
    height = small.shape[0]
    boxes = []
    for x, y, w, h, area in stats[1:count]:
        fill = area / float(w * h)
        if min_height <= h <= height // 4 and w >= 1.2 * h and w >= 12 and fill > 0.5:
            # Pad by part of the line height: the stroke response misses ascenders, descenders and end letters.
            pad_x, pad_y = 0.6 * h, 0.4 * h
            boxes.append((max(0.0, x - pad_x), max(0.0, y - pad_y), min(small.shape[1], x + w + pad_x),
                          min(height, y + h + pad_y), "text", min(1.0, 0.4 + fill / 2)))
    return boxes


def _detect_hands(small: np.ndarray, faces: list, config: PickerConfig) -> list[tuple[float, float, float, float, str, float]]:
    """Skin blobs that are not a face, grown to take in what they hold.

    When the cascade found no face, a skin blob reaching into the top half and taller than wide
    is taken for a face (a profile, or a face the cascade missed) and is not a hand.
    """
    ycrcb = cv2.cvtColor(small, cv2.COLOR_RGB2YCrCb)
    skin = cv2.inRange(ycrcb, (40, 138, 77), (240, 173, 127))
    skin = cv2.morphologyEx(skin, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    for x0, y0, x1, y1, *_ in faces:  # a face is skin too, but not a hand
        pad = 0.25 * (x1 - x0)
        skin[int(max(0, y0 - pad)):int(y1 + 2 * pad), int(max(0, x0 - pad)):int(x1 + pad)] = 0
    count, _, stats, _ = cv2.connectedComponentsWithStats(skin, connectivity=8)
    height, width = small.shape[:2]
    boxes = []
    for x, y, w, h, area in stats[1:count]:
        if area < config.min_skin_share * width * height or area < 0.4 * w * h or area > 0.1 * width * height:
            continue
        if not faces and y < height / 2 and h > w:
            continue
        gx, gy = config.hand_grow * w, config.hand_grow * h
        boxes.append((max(0.0, x - gx), max(0.0, y - gy), min(width, x + w + gx), min(height, y + h + gy), "hand", 0.5))
    return boxes


def _merge(boxes: list[tuple]) -> list[tuple]:
    """Union boxes that mostly overlap (half the smaller one) until none do; the union keeps the best score and all labels."""
    boxes = list(boxes)
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                overlap_w, overlap_h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
                smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
                # Merge only boxes mostly on top of each other: one box round everything would be uniform coding.
                if overlap_w > 0 and overlap_h > 0 and overlap_w * overlap_h >= 0.5 * smaller:
                    labels = "+".join(sorted(set(a[4].split("+")) | set(b[4].split("+"))))
                    boxes[i] = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]), labels,
                                max(a[5], b[5]))
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return boxes


def _to_region(box: tuple, width: int, height: int) -> Region:
    x0, y0, x1, y1, label, score = box
    x0, y0 = min(max(x0 / width, 0.0), 1.0), min(max(y0 / height, 0.0), 1.0)
    w, h = min(x1 / width, 1.0) - x0, min(y1 / height, 1.0) - y0
    return Region(float(x0), float(y0), float(max(w, 1e-3)), float(max(h, 1e-3)), label, float(score))
