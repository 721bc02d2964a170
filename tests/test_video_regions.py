"""Context-aware bitrate: control messages, the sender's prefilter, the region picker and a small VP8 bench."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from fusion.chat_regions import CENTER, RegionPicker
from launch.chat_bench import bitrate_bench, synthetic_call_clip
from transport.video_regions import (MAX_REGIONS, ControlMessageError, RateHint, Region, RegionsHint, parse_control,
                                     prefilter, rate_message, region_mask, regions_message)

CARD = Region(0.1, 0.2, 0.3, 0.25, "text", 0.8)


def test_regions_message_round_trip():
    regions = [CARD, Region(0.5, 0.5, 0.5, 0.5, "face")]
    hint = parse_control(regions_message(regions, reason="question asks to read"))
    assert hint == RegionsHint(regions=tuple(regions), reason="question asks to read")
    assert parse_control(regions_message([])) == RegionsHint(regions=(), reason="")


def test_rate_message_round_trip():
    assert parse_control(rate_message(2.5)) == RateHint(fps=2.5)


@pytest.mark.parametrize(("text", "names"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"type": "zoom"}', "unknown type 'zoom'"),
    ('{"type": "rate"}', "fps"),
    ('{"type": "rate", "fps": 0}', "fps"),
    ('{"type": "rate", "fps": 1000}', "fps"),
    ('{"type": "rate", "fps": "fast"}', "fps"),
    ('{"type": "regions", "regions": {}}', "'regions' must be a list"),
    ('{"type": "regions", "regions": [{"x": 0.1, "y": 0.1, "w": 0.2, "label": "t"}]}', "missing field(s) h"),
    ('{"type": "regions", "regions": [{"x": 1.5, "y": 0.1, "w": 0.2, "h": 0.2, "label": "t"}]}', "Region.x"),
    ('{"type": "regions", "regions": [{"x": 0.9, "y": 0.1, "w": 0.2, "h": 0.2, "label": "t"}]}', "Region.w"),
    ('{"type": "regions", "regions": [{"x": 0.1, "y": 0.1, "w": 0.2, "h": 0.2, "label": ""}]}', "Region.label"),
    ('{"type": "regions", "regions": [{"x": 0.1, "y": 0.1, "w": 0.2, "h": 0.2, "label": "t", "score": 2}]}',
     "Region.score"),
    ('{"type": "regions", "regions": [], "reason": 3}', "'reason'"),
])
def test_parse_control_rejects_malformed(text, names):
    with pytest.raises(ControlMessageError, match=names.replace("(", r"\(").replace(")", r"\)")):
        parse_control(text)


def test_too_many_regions_rejected():
    regions = [Region(0.0, 0.0, 0.1, 0.1, "face")] * (MAX_REGIONS + 1)
    text = json.dumps({"type": "regions", "regions": [r.to_dict() for r in regions]})
    with pytest.raises(ValueError, match=f"at most {MAX_REGIONS}"):
        parse_control(text)
    with pytest.raises(ValueError, match=f"at most {MAX_REGIONS}"):
        regions_message(regions)
    assert len(parse_control(regions_message(regions[:MAX_REGIONS])).regions) == MAX_REGIONS


def test_region_mask_covers_grown_box():
    mask = region_mask((100, 200), [CARD], margin=0.0)
    assert mask.shape == (100, 200) and mask.sum() == 60 * 25
    assert mask[20:45, 20:80].all() and not mask[19, 20] and not mask[20, 80]
    grown = region_mask((100, 200, 3), [CARD], margin=0.05)
    assert grown[15:50, 10:90].all() and grown.sum() == 80 * 35
    assert not region_mask((100, 200), []).any()


@pytest.mark.parametrize("outside", ["blur", "downsample"])
def test_prefilter_keeps_regions_and_degrades_the_rest(outside):
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    out = prefilter(image, [CARD], outside=outside, margin=0.02)
    mask = region_mask(image.shape, [CARD], margin=0.02)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[mask], image[mask])
    changed = np.any(out != image, axis=2)[~mask]
    assert changed.mean() > 0.9
    assert out[~mask].astype(float).std() < 0.5 * image[~mask].astype(float).std()  # smoothed, not just shuffled


def test_prefilter_without_regions_is_uniform():
    image = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    out = prefilter(image, [])
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize(("image", "kwargs", "names"), [
    (np.zeros((10, 10), np.uint8), {}, "shape"),
    (np.zeros((10, 10, 3), np.float32), {}, "uint8"),
    ([[0, 0, 0]], {}, "numpy array"),
    (np.zeros((10, 10, 3), np.uint8), {"outside": "pixelate"}, "outside"),
    (np.zeros((10, 10, 3), np.uint8), {"strength": 0}, "strength"),
])
def test_prefilter_rejects_bad_input(image, kwargs, names):
    with pytest.raises(ValueError, match=names):
        prefilter(image, [CARD], **kwargs)


@pytest.fixture(scope="module")
def picker():
    return RegionPicker()


def test_picker_finds_the_sign_text(picker):
    image = np.full((480, 640, 3), 90, np.uint8)
    cv2.rectangle(image, (380, 300), (620, 400), (250, 250, 250), -1)
    cv2.putText(image, "EXIT 12", (400, 365), cv2.FONT_HERSHEY_SIMPLEX, 1.4, (10, 10, 10), 3, cv2.LINE_AA)
    regions, reason = picker.pick(image, "What does the sign say?")
    assert regions and all(r.label == "text" for r in regions) and "sign" in reason
    covered = region_mask(image.shape, regions, margin=0.0)
    ink = np.all(image < 60, axis=2)
    assert covered[ink].mean() > 0.9  # the printed letters are inside the regions
    assert covered.mean() < 0.15  # and the regions are not the whole frame


def test_picker_falls_back_on_blank_image(picker):
    regions, reason = picker.pick(np.full((240, 320, 3), 128, np.uint8), "who is that?")
    assert regions == [CENTER]
    assert "no faces found" in reason and "central" in reason


def test_picker_is_fast(picker):
    frame = synthetic_call_clip(n_frames=1)[0]
    picker.pick(frame, "")
    import time
    started = time.perf_counter()
    for _ in range(3):
        picker.pick(frame, "")
    assert (time.perf_counter() - started) / 3 < 0.05


def test_small_bitrate_bench_saves_bits():
    frames = synthetic_call_clip(n_frames=12, size=(640, 480))  # at 320x240 the card text is too small to find
    result = bitrate_bench(frames, quantizers=(12, 32), question="what does the card say?", pick_every=6)
    assert result["frames"] == 12 and result["size"] == [640, 480]
    assert 0.0 < result["region_share"] < 0.5
    for name in ("uniform", "context"):
        assert [p["setting"] for p in result[name]] == [12, 32]
        for point in result[name]:
            assert set(point) == {"setting", "kbps", "psnr_in", "ssim_in", "psnr_out"}
            assert point["kbps"] > 0 and 20 < point["psnr_in"] < 80 and 0 < point["ssim_in"] <= 1
    for uniform, context in zip(result["uniform"], result["context"]):
        assert context["kbps"] < uniform["kbps"]
        assert context["psnr_out"] < uniform["psnr_out"]  # outside was blurred away
    saving = result["saving_at_equal_psnr"]
    assert set(saving) == {"psnr_db", "uniform_kbps", "context_kbps", "saving"}
    json.dumps(result)
