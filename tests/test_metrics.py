"""Golden tests for models.metrics; every expected AP is worked out by hand in a comment."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.metrics import IOU_THRESHOLDS, APAccumulator, ModaAccumulator, voc_ap

KEYS = ("0.3", "0.5", "0.7")


def _box(x_m: float, y_m: float = 0.0) -> list[float]:
    """A 2 x 2 x 1 m axis-aligned box centred at (x, y, 0)."""
    return [x_m, y_m, 0.0, 2.0, 2.0, 1.0, 0.0]


def _det(x_m: float, score: float, y_m: float = 0.0) -> list[float]:
    return [*_box(x_m, y_m), score]


FAR_M = 100.0  # a detection this far from every GT box overlaps nothing: a false positive


def _ap(frames: list[tuple[list[list[float]], list[list[float]]]]) -> dict[str, float]:
    accumulator = APAccumulator()
    for det, gt in frames:
        accumulator.add_frame(np.array(det).reshape(-1, 8), np.array(gt).reshape(-1, 7))
    return accumulator.result()


def test_thresholds() -> None:
    assert IOU_THRESHOLDS == (0.3, 0.5, 0.7)


def test_voc_ap_hand_case() -> None:
    # Ranked: TP, FP, TP with 2 GT -> recall [.5, .5, 1], precision [1, .5, 2/3].
    # Padded: r [0, .5, .5, 1, 1], p [0, 1, .5, 2/3, 0] -> monotone p [1, 1, 2/3, 2/3, 0].
    # Recall changes at 0->.5 (p 1) and .5->1 (p 2/3): AP = .5 * 1 + .5 * 2/3 = 5/6.
    assert voc_ap(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == pytest.approx(5 / 6)


def test_perfect_detections() -> None:
    frames = [
        ([_det(0.0, 0.9), _det(10.0, 0.8)], [_box(0.0), _box(10.0)]),
        ([_det(5.0, 0.7)], [_box(5.0)]),
    ]
    assert _ap(frames) == pytest.approx({key: 1.0 for key in KEYS})


def test_higher_scored_false_positive() -> None:
    # Ranked: FP (0.9), TP (0.5); 1 GT -> recall [0, 1], precision [0, 0.5].
    # Padded r [0, 0, 1, 1], p [0, 0, .5, 0] -> monotone [.5, .5, .5, 0]; AP = 1 * 0.5 = 0.5.
    frames = [([_det(FAR_M, 0.9), _det(0.0, 0.5)], [_box(0.0)])]
    assert _ap(frames) == pytest.approx({key: 0.5 for key in KEYS})


def test_lower_scored_false_positive_costs_nothing() -> None:
    # Ranked: TP, FP -> recall [1, 1], precision [1, .5]; recall reaches 1 at precision 1.
    frames = [([_det(0.0, 0.9), _det(FAR_M, 0.5)], [_box(0.0)])]
    assert _ap(frames) == pytest.approx({key: 1.0 for key in KEYS})


def test_half_of_the_ground_truth_found() -> None:
    # One TP, 2 GT: recall [.5], precision [1] -> AP = .5 * 1 + .5 * 0 = 0.5.
    frames = [([_det(0.0, 0.9)], [_box(0.0), _box(10.0)])]
    assert _ap(frames) == pytest.approx({key: 0.5 for key in KEYS})


def test_no_detections_scores_zero() -> None:
    assert _ap([([], [_box(0.0)]), ([], [_box(3.0)])]) == {key: 0.0 for key in KEYS}


def test_detections_without_ground_truth_score_zero() -> None:
    assert _ap([([_det(0.0, 0.9)], []), ([], [])]) == {key: 0.0 for key in KEYS}


def test_nothing_at_all_is_nan() -> None:
    result = _ap([([], []), ([], [])])
    assert set(result) == set(KEYS)
    assert all(math.isnan(value) for value in result.values())
    assert all(math.isnan(value) for value in APAccumulator().result().values())


def test_duplicate_detection_is_a_false_positive() -> None:
    # Both detections overlap the GT at x=0; the lower-scored one finds it consumed: TP, FP.
    # With a second GT that nobody finds: recall [.5, .5], precision [1, .5] -> AP 0.5.
    # (Were the duplicate wrongly a TP, recall would reach 1 and AP would be 1.)
    frames = [([_det(0.0, 0.9), _det(0.1, 0.8)], [_box(0.0), _box(50.0)])]
    assert _ap(frames) == pytest.approx({key: 0.5 for key in KEYS})


def test_duplicate_before_the_match_is_the_false_positive() -> None:
    # The higher-scored duplicate takes the GT, so the lower-scored one is the FP even when it
    # fits better: ranked TP, FP with 1 GT -> AP 1.0 at 0.3 and 0.5.
    # At 0.7 the first (IoU 0.6, see below) is an FP and the exact one then a TP:
    # ranked FP, TP -> recall [0, 1], precision [0, .5] -> AP 0.5.
    result = _ap([([_det(0.5, 0.9), _det(0.0, 0.8)], [_box(0.0)])])
    assert result == pytest.approx({"0.3": 1.0, "0.5": 1.0, "0.7": 0.5})


def test_iou_threshold_dependence() -> None:
    # Two 2 x 2 squares 0.5 m apart in x: overlap 1.5 * 2 = 3, union 4 + 4 - 3 = 5, IoU 0.6.
    # TP at 0.3 and 0.5 (AP 1), FP at 0.7 (no TP at all: AP 0).
    result = _ap([([_det(0.5, 0.9)], [_box(0.0)])])
    assert result == pytest.approx({"0.3": 1.0, "0.5": 1.0, "0.7": 0.0})


def test_greedy_match_takes_highest_iou_unmatched_gt() -> None:
    # GT at x=0 and x=1.5; a detection at x=1 overlaps both (IoU 1/3 and 3/5) and takes the
    # x=1.5 box; a second detection at x=0 then takes the x=0 box. Both TP at 0.3 and 0.5.
    # At 0.7 the first is an FP (0.6 < 0.7) and the second a TP: ranked FP, TP with 2 GT ->
    # recall [0, .5], precision [0, .5] -> AP .5 * .5 = 0.25.
    result = _ap([([_det(1.0, 0.9), _det(0.0, 0.8)], [_box(0.0), _box(1.5)])])
    assert result == pytest.approx({"0.3": 1.0, "0.5": 1.0, "0.7": 0.25})


def test_detections_ranked_globally_across_frames() -> None:
    # Frame 1: one GT, a TP scored 0.2. Frame 2: one GT, an FP scored 0.9 and a TP scored 0.8.
    # Frame by frame (TP .2 | FP .9, TP .8) one would get TP, FP, TP -> AP 5/6 (see voc_ap test).
    # Ranked globally: FP .9, TP .8, TP .2 with 2 GT -> recall [0, .5, 1],
    # precision [0, .5, 2/3]; padded r [0, 0, .5, 1, 1], p [0, 0, .5, 2/3, 0] ->
    # monotone [2/3, 2/3, 2/3, 2/3, 0]; AP = .5 * 2/3 + .5 * 2/3 = 2/3.
    frames = [([_det(0.0, 0.2)], [_box(0.0)]), ([_det(FAR_M, 0.9), _det(0.0, 0.8)], [_box(0.0)])]
    assert _ap(frames) == pytest.approx({key: 2 / 3 for key in KEYS})


def test_frames_and_gt_count() -> None:
    accumulator = APAccumulator(iou_thresholds=(0.5,))
    accumulator.add_frame(np.array([_det(0.0, 0.9)]), np.array([_box(0.0), _box(9.0)]))
    accumulator.add_frame(np.zeros((0, 8)), np.zeros((0, 7)))
    assert accumulator.frames == 2
    assert accumulator.gt_count == 2
    assert accumulator.result() == pytest.approx({"0.5": 0.5})


def test_detections_sorted_within_frame_regardless_of_input_order() -> None:
    # Same as test_higher_scored_false_positive with the detections given low score first.
    frames = [([_det(0.0, 0.5), _det(FAR_M, 0.9)], [_box(0.0)])]
    assert _ap(frames) == pytest.approx({key: 0.5 for key in KEYS})


# ------------------------------------------------------------------------------------------------
# MODA / MODP


def test_moda_matches_one_to_one_by_the_hungarian_algorithm() -> None:
    # Nearest-first matching would pair the first detection with the person at the origin and leave
    # the second detection (0.9 m from the other person) a false positive; the optimal assignment
    # matches both.
    moda = ModaAccumulator(0.5)
    moda.add_frame(np.array([[0.25, 0.0], [-0.3, 0.0]]), np.array([[0.0, 0.0], [0.6, 0.0]]))
    result = moda.result()
    assert (result["tp"], result["fp"], result["fn"]) == (2, 0, 0)
    assert result["moda"] == pytest.approx(1.0)
    assert result["modp"] == pytest.approx(((1 - 0.35 / 0.5) + (1 - 0.3 / 0.5)) / 2)


def test_moda_counts_misses_and_false_alarms_over_frames() -> None:
    moda = ModaAccumulator()
    moda.add_frame(np.array([[10.0, 10.0], [0.1, 0.0]]), np.array([[0.0, 0.0], [5.0, 5.0], [7.0, 7.0]]))
    moda.add_frame(np.zeros((0, 2)), np.array([[1.0, 1.0]]))  # a frame where nothing is found
    moda.add_frame(np.array([[3.0, 3.0], [3.0, 3.4]]), np.zeros((0, 2)))  # a frame with nobody there
    moda.add_frame(np.array([[0.0, 0.51]]), np.array([[0.0, 0.0]]))  # just out of reach: a miss and a false alarm
    result = moda.result()
    assert (result["tp"], result["fp"], result["fn"], result["gt"], result["frames"]) == (1, 4, 4, 5, 4)
    assert result["moda"] == pytest.approx(1 - 8 / 5)  # more errors than people: negative
    assert result["modp"] == pytest.approx(1 - 0.1 / 0.5)
    assert result["recall"] == pytest.approx(1 / 5) and result["precision"] == pytest.approx(1 / 5)


def test_moda_edge_cases_and_bad_input() -> None:
    empty = ModaAccumulator().result()
    assert np.isnan(empty["moda"]) and np.isnan(empty["modp"])
    with pytest.raises(ValueError, match="finite"):
        ModaAccumulator().add_frame(np.array([[np.nan, 0.0]]), np.zeros((0, 2)))
    with pytest.raises(ValueError, match=r"\[N, >=2\]"):
        ModaAccumulator().add_frame(np.zeros((3, 1)), np.zeros((0, 2)))
    with pytest.raises(ValueError, match="radius"):
        ModaAccumulator(0.0)
