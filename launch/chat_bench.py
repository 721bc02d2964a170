"""Context-aware bitrate for video chat: bits saved at equal in-region quality, against uniform encoding.

The clip is encoded with VP8 (libvpx through PyAV, realtime deadline as a WebRTC sender would)
twice per quantizer setting: uniformly, and prefiltered with the regions that
:class:`fusion.chat_regions.RegionPicker` picked for a question (on the *original* frames, as
the server would, refreshed every ``pick_every`` frames). Both are decoded and scored against
the original frames: PSNR and SSIM inside the regions, PSNR outside. Each side's bitrate
needed to reach one in-region PSNR is interpolated in log-bitrate, and the saving reported.

The default clip is **synthetic** (:func:`synthetic_call_clip`): a noise-textured room swaying
slowly, a drawn face-like figure, a card with printed text and a hand holding a mug. It is
deterministic and needs no files, but its texture statistics are not a camera's; real
figures need a real recording: ``cpstream bench chat --video FILE``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from fractions import Fraction

import av
import cv2
import numpy as np

from fusion.chat_regions import RegionPicker
from transport.video_regions import Region, prefilter, region_mask

logger = logging.getLogger(__name__)

DEFAULT_QUANTIZERS = (8, 16, 24, 32, 44)
"""VP8 quantizer settings (``qmin = qmax``, 0..63, lower is better) swept by :func:`bitrate_bench`."""
DEFAULT_QUESTION = "Can you read what's on the card I'm holding?"
FPS = 30


def synthetic_call_clip(n_frames: int = 60, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[np.ndarray]:
    """A deterministic synthetic "video call": ``n_frames`` RGB ``[H, W, 3]`` uint8 frames of ``size = (W, H)``.

    A room of noise-textured shelves and books sways slowly behind a face-like figure; a white
    card with printed text and a skin-coloured hand holding a mug move a little in front.
    """
    width, height = size
    rng = np.random.default_rng(seed)
    pad = width // 8
    room = _room(width + 2 * pad, height + 2 * pad, rng)
    frames = []
    for i in range(n_frames):
        phase = 2 * math.pi * i / max(n_frames, 1)
        dx, dy = int(pad + 0.6 * pad * math.sin(phase)), int(pad + 0.3 * pad * math.sin(2 * phase))
        frame = room[dy:dy + height, dx:dx + width].copy()
        _draw_person(frame, width, height, i)
        frames.append(frame)
    return frames


def _room(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(0.0, 1.0, (height, width, 1)).astype(np.float32)
    wall = np.clip(150 + 25 * cv2.GaussianBlur(noise, (0, 0), 2.0)[..., None] + 4 * noise, 0, 255)
    room = np.repeat(wall, 3, axis=2) * np.array([1.0, 0.95, 0.85], np.float32)
    for _ in range(40):  # shelves, books and boxes: coloured, noise-textured rectangles
        x, y = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        w, h = int(rng.integers(10, width // 5)), int(rng.integers(10, height // 4))
        colour = rng.uniform(40, 220, 3).astype(np.float32)
        patch = room[y:y + h, x:x + w]
        patch[:] = colour + rng.normal(0, 12, patch.shape[:2] + (1,)).astype(np.float32)
    return np.clip(room, 0, 255).astype(np.uint8)


def _draw_person(frame: np.ndarray, width: int, height: int, i: int) -> None:
    s = width / 640
    bob = int(4 * s * math.sin(i / 5))
    cx, cy = int(0.42 * width), int(0.38 * height) + bob
    skin, dark = (224, 172, 140), (60, 40, 30)
    cv2.ellipse(frame, (cx, int(cy + 190 * s)), (int(150 * s), int(110 * s)), 0, 180, 360, (40, 70, 130), -1)  # torso
    cv2.ellipse(frame, (cx, cy), (int(62 * s), int(80 * s)), 0, 0, 360, skin, -1, cv2.LINE_AA)  # face
    cv2.ellipse(frame, (cx, cy - int(50 * s)), (int(66 * s), int(40 * s)), 0, 180, 360, dark, -1, cv2.LINE_AA)  # hair
    for ex in (-24, 24):
        cv2.ellipse(frame, (cx + int(ex * s), cy - int(12 * s)), (int(12 * s), int(6 * s)), 0, 0, 360, (250, 250, 250), -1)
        cv2.circle(frame, (cx + int(ex * s), cy - int(12 * s)), max(1, int(5 * s)), dark, -1)
        cv2.line(frame, (cx + int((ex - 14) * s), cy - int(28 * s)), (cx + int((ex + 14) * s), cy - int(30 * s)), dark,
                 max(1, int(4 * s)))
    cv2.line(frame, (cx, cy - int(5 * s)), (cx - int(6 * s), cy + int(18 * s)), (180, 120, 100), max(1, int(3 * s)))
    cv2.ellipse(frame, (cx, cy + int(40 * s)), (int(22 * s), int(8 * s)), 0, 0, 180, (150, 50, 60), max(1, int(4 * s)))
    # The card, held up beside the face, with two printed lines.
    kx, ky = int(0.66 * width) + int(3 * s * math.sin(i / 7)), int(0.16 * height)
    cv2.rectangle(frame, (kx, ky), (kx + int(170 * s), ky + int(100 * s)), (245, 245, 240), -1)
    for line, text in enumerate(("OPEN 9-5", "Room 204")):
        cv2.putText(frame, text, (kx + int(10 * s), ky + int((40 + 40 * line) * s)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.9 * s, (20, 20, 20), max(1, int(2 * s)), cv2.LINE_AA)
    # A hand holding a mug, low in the frame.
    hx, hy = int(0.72 * width), int(0.74 * height) - bob
    cv2.rectangle(frame, (hx - int(40 * s), hy - int(70 * s)), (hx + int(40 * s), hy + int(20 * s)), (200, 30, 40), -1)
    cv2.ellipse(frame, (hx + int(40 * s), hy - int(25 * s)), (int(18 * s), int(25 * s)), 0, -90, 90, (200, 30, 40),
                max(1, int(6 * s)))
    cv2.ellipse(frame, (hx - int(45 * s), hy - int(10 * s)), (int(28 * s), int(38 * s)), 0, 0, 360, skin, -1)
    for finger in range(4):
        cv2.ellipse(frame, (hx - int(20 * s), hy - int((40 - 14 * finger) * s)), (int(18 * s), int(6 * s)), 0, 0, 360,
                    skin, -1)


def read_video(path: str, max_frames: int = 300) -> list[np.ndarray]:
    """Up to ``max_frames`` RGB ``[H, W, 3]`` uint8 frames of a video file, decoded with PyAV."""
    frames = []
    with av.open(path) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return frames


def encode_vp8(frames: Sequence[np.ndarray], quantizer: int, codec: str = "libvpx") -> tuple[int, list[np.ndarray]]:
    """Encode ``frames`` at a fixed quantizer (``qmin = qmax``); returns the bytes sent and the decoded RGB frames."""
    height, width = frames[0].shape[:2]
    encoder = av.CodecContext.create(codec, "w")
    encoder.width, encoder.height, encoder.pix_fmt = width - width % 2, height - height % 2, "yuv420p"
    encoder.time_base, encoder.framerate = Fraction(1, FPS), Fraction(FPS, 1)
    # libvpx refuses qmin/qmax without a target bitrate; this one is only a ceiling that a fixed quantizer never meets.
    encoder.bit_rate = 200_000_000
    encoder.options = {"qmin": str(quantizer), "qmax": str(quantizer), "deadline": "realtime", "cpu-used": "8"}
    packets = []
    for index, image in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[:encoder.height, :encoder.width]), format="rgb24")
        frame = frame.reformat(format="yuv420p")
        frame.pts = index
        packets += encoder.encode(frame)
    packets += encoder.encode(None)
    decoder = av.CodecContext.create(codec, "r")
    decoded = [f.to_ndarray(format="rgb24") for p in packets for f in decoder.decode(p)]
    decoded += [f.to_ndarray(format="rgb24") for f in decoder.decode(None)]
    return sum(p.size for p in packets), decoded


def psnr_db(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """PSNR over the pixels where ``mask`` is True (all channels); inf when they are equal, nan when none."""
    if not mask.any():
        return float("nan")
    mse = np.mean((a[mask].astype(np.float64) - b[mask].astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * math.log10(255.0**2 / mse))


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM per pixel of the luma of two RGB frames (Gaussian window, sigma 1.5, as Wang et al. 2004)."""
    x = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY).astype(np.float64)
    y = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY).astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(z: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(z, (11, 11), 1.5)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def _score(originals: Sequence[np.ndarray], decoded: Sequence[np.ndarray], masks: Sequence[np.ndarray],
           n_bytes: int) -> dict[str, float]:
    inside = np.stack(masks)
    ref, out = np.stack(originals), np.stack(decoded)
    ssim_in = np.mean([ssim_map(a, b)[m].mean() for a, b, m in zip(originals, decoded, masks) if m.any()])
    return {"kbps": n_bytes * 8 * FPS / len(originals) / 1000, "psnr_in": psnr_db(ref, out, inside),
            "ssim_in": float(ssim_in), "psnr_out": psnr_db(ref, out, ~inside)}


def _kbps_at(points: list[dict], psnr: float) -> float:
    """Bitrate at ``psnr`` on a rate-quality curve, interpolated linearly in log-bitrate."""
    ordered = sorted(points, key=lambda p: p["psnr_in"])
    qualities = [p["psnr_in"] for p in ordered]
    return float(math.exp(np.interp(psnr, qualities, [math.log(p["kbps"]) for p in ordered])))


def saving_at_equal_psnr(uniform: list[dict], context: list[dict]) -> dict[str, float]:
    """The bitrate each curve needs for one in-region PSNR inside both curves' range, and the share saved.

    That PSNR is the uniform curve's middle setting's, moved into the range both curves reach.
    """
    low = max(min(p["psnr_in"] for p in uniform), min(p["psnr_in"] for p in context))
    high = min(max(p["psnr_in"] for p in uniform), max(p["psnr_in"] for p in context))
    if low > high:
        return {"psnr_db": float("nan"), "uniform_kbps": float("nan"), "context_kbps": float("nan"),
                "saving": float("nan")}
    target = min(max(sorted(p["psnr_in"] for p in uniform)[len(uniform) // 2], low), high)
    uniform_kbps, context_kbps = _kbps_at(uniform, target), _kbps_at(context, target)
    return {"psnr_db": round(target, 2), "uniform_kbps": round(uniform_kbps, 1), "context_kbps": round(context_kbps, 1),
            "saving": round(1 - context_kbps / uniform_kbps, 3)}


def pick_regions(frames: Sequence[np.ndarray], question: str, pick_every: int,
                 picker: RegionPicker | None = None) -> tuple[list[list[Region]], list[str]]:
    """Regions per frame, picked on every ``pick_every``-th original frame and held until the next pick."""
    picker = picker or RegionPicker()
    per_frame, reasons = [], []
    for index, frame in enumerate(frames):
        if index % pick_every == 0:
            current, reason = picker.pick(frame, question)
            reasons.append(reason)
        per_frame.append(current)
    return per_frame, reasons


def bitrate_bench(frames: list[np.ndarray] | None = None, *, seed: int = 0,
                  quantizers: Sequence[int] = DEFAULT_QUANTIZERS, codec: str = "libvpx", outside: str = "blur",
                  question: str = DEFAULT_QUESTION, pick_every: int = 15, strength: int | None = None) -> dict:
    """Uniform against context-prefiltered VP8 on one clip; see the module docstring.

    Args:
        frames: RGB ``[H, W, 3]`` uint8 frames; None: :func:`synthetic_call_clip` with ``seed``.
        quantizers: the quality settings swept: VP8 fixed quantizers (0..63; libvpx's ``crf``
            needs a bitrate cap in VP8, so a fixed quantizer is the clean equal-setting knob).
        outside: :func:`transport.video_regions.prefilter` mode.

    Returns:
        ``{"uniform": [...], "context": [...], "saving_at_equal_psnr": {...}, "region_share",
        "frames", "size", "reasons"}``; each curve point is ``{"setting", "kbps", "psnr_in",
        "ssim_in", "psnr_out"}`` (kbps at 30 fps).
    """
    frames = synthetic_call_clip(seed=seed) if frames is None else list(frames)
    regions, reasons = pick_regions(frames, question, pick_every)
    masks = [region_mask(f.shape, r, margin=0.0) for f, r in zip(frames, regions)]
    filtered = [prefilter(f, r, outside=outside, strength=strength) for f, r in zip(frames, regions)]
    curves: dict[str, list[dict]] = {"uniform": [], "context": []}
    for quantizer in quantizers:
        for name, clip in (("uniform", frames), ("context", filtered)):
            n_bytes, decoded = encode_vp8(clip, quantizer, codec)
            h, w = decoded[0].shape[:2]
            point = _score([f[:h, :w] for f in frames], decoded, [m[:h, :w] for m in masks], n_bytes)
            curves[name].append({"setting": quantizer, **{k: round(v, 3) for k, v in point.items()}})
    height, width = frames[0].shape[:2]
    return {**curves, "saving_at_equal_psnr": saving_at_equal_psnr(curves["uniform"], curves["context"]),
            "region_share": round(float(np.mean([m.mean() for m in masks])), 3), "frames": len(frames),
            "size": [width, height], "reasons": sorted(set(reasons))}
