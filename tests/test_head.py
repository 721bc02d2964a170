"""Tests for models.head: target encoding round trip, loss edge cases, rotated NMS, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.bev import BevGrid
from models.geometry import wrap_angle_rad
from models.head import (CenterHead, HeadOutput, HeadTargets, build_targets, compute_loss, decode,
                         drop_duplicate_centres, gaussian_radius_cells, rotated_nms)

GRID = BevGrid(x_min_m=-16.0, x_max_m=16.0, y_min_m=-16.0, y_max_m=16.0, cell_size_m=0.4)
STRIDE = 2  # head map: 40 x 40 cells of 0.8 m
ROWS = COLS = 40
CELL_M = 0.8

# (x, y, z, l, w, h, yaw_rad), spread out so NMS keeps them all; yaws include both sides of +-pi.
ROUND_TRIP_BOXES = np.array([
    [-10.3, -9.7, -1.2, 4.5, 1.9, 1.6, 0.0],
    [3.21, -5.55, -0.8, 4.2, 1.8, 1.5, math.pi - 1e-4],
    [9.9, 8.05, -1.0, 0.8, 0.6, 1.7, -math.pi + 1e-4],
    [-4.4, 10.1, -0.9, 10.0, 2.5, 3.2, 1.3],
    [12.7, -12.3, -1.1, 4.0, 2.0, 1.5, -2.6],
    [-15.95, 15.95, 0.3, 1.0, 1.0, 1.0, math.pi / 2],  # centre in the corner cell
])
ROUND_TRIP_LABELS = np.array([0, 0, 1, 0, 0, 1])
OUTSIDE_BOX = np.array([[40.0, 0.0, -1.0, 4.0, 2.0, 1.5, 0.0]])  # centre beyond the grid: skipped


def _dense(values: torch.Tensor, targets: HeadTargets) -> torch.Tensor:
    """Scatters per-object values [B, N, C] into a [B, C, H', W'] map at their centre cells."""
    batch, _, channels = values.shape
    dense = torch.zeros(batch, channels, ROWS * COLS)
    for b in range(batch):
        index = targets.index[b][targets.mask[b]]  # [n]
        dense[b][:, index] = values[b][targets.mask[b]].T
    return dense.reshape(batch, channels, ROWS, COLS)


def _perfect_output(targets: HeadTargets) -> HeadOutput:
    """The output a perfect head would give: confident peaks and exact regressions."""
    return HeadOutput(
        heatmap=torch.where(targets.heatmap == 1.0, 12.0, -12.0),
        offset=_dense(targets.offset, targets),
        z=_dense(targets.z, targets),
        size=_dense(targets.size, targets),
        yaw=_dense(targets.yaw, targets),
    )


def _nearest(detections: torch.Tensor, box: np.ndarray) -> np.ndarray:
    distance = np.hypot(detections[:, 0].numpy() - box[0], detections[:, 1].numpy() - box[1])  # [N]
    return detections[int(np.argmin(distance))].numpy()


def test_build_targets_then_decode_round_trip() -> None:
    boxes = np.concatenate([ROUND_TRIP_BOXES, OUTSIDE_BOX])
    labels = np.concatenate([ROUND_TRIP_LABELS, [0]])
    # Second sample: the same boxes as torch tensors, to cover both input types.
    targets = build_targets([boxes, torch.from_numpy(boxes)], [labels, torch.from_numpy(labels)], GRID, STRIDE, 2)
    assert targets.heatmap.shape == (2, 2, ROWS, COLS)
    assert targets.mask.sum(dim=1).tolist() == [6, 6]  # the outside box is skipped
    assert int((targets.heatmap == 1.0).sum()) == 12
    perfect = _perfect_output(targets)
    losses = compute_loss(perfect, targets)
    for name in ("offset", "z", "size", "yaw"):
        assert float(losses[name]) == pytest.approx(0.0, abs=1e-6)
    assert float(losses["heatmap"]) < 1e-3

    for detections in decode(perfect, GRID, STRIDE):
        assert detections.shape == (6, 9)
        assert torch.all(detections[:, 7] > 0.99)
        for box, label in zip(ROUND_TRIP_BOXES, ROUND_TRIP_LABELS, strict=True):
            found = _nearest(detections, box)
            np.testing.assert_allclose(found[:3], box[:3], atol=1e-3)
            np.testing.assert_allclose(found[3:6], box[3:6], rtol=1e-5)
            # Headings are defined modulo pi (a box turned by pi is the same box).
            assert abs(wrap_angle_rad(2 * (found[6] - box[6]))) < 2e-4
            assert -np.pi / 2 <= found[6] <= np.pi / 2
            assert found[8] == label


def test_two_cars_side_by_side_in_neighbouring_cells_are_both_decoded() -> None:
    # Centres 0.8 m apart (neighbouring cells of 0.8 m), the 0.7 m wide boxes do not overlap: NMS keeps
    # both, while a 3x3 local-maximum rule drops the weaker one.
    boxes = np.array([[0.4, 0.4, -1.0, 3.0, 0.7, 1.5, 0.0], [0.4, 1.2, -1.0, 3.0, 0.7, 1.5, 0.0]])
    targets = build_targets([boxes], [np.zeros(2, np.int64)], GRID, STRIDE, 1)
    perfect = _perfect_output(targets)
    weaker = targets.heatmap.clone()
    weaker[targets.heatmap == 1.0] = torch.tensor([0.9, 0.7])
    heatmap = torch.logit(weaker.clamp(1e-4, 1 - 1e-4))  # the gaussians around both centres
    out = HeadOutput(heatmap=heatmap, offset=perfect.offset, z=perfect.z, size=perfect.size, yaw=perfect.yaw)
    for rule in ({}, {"peak_window": 1}, {"peak_ratio": 0.0}):  # the default (3, 0.5) and every cell
        both = decode(out, GRID, STRIDE, score_threshold=0.5, **rule)[0]
        assert len(both) == 2, rule
        np.testing.assert_allclose(sorted(both[:, 1].tolist()), [0.4, 1.2], atol=1e-4)
    assert len(decode(out, GRID, STRIDE, score_threshold=0.5, peak_ratio=1.0)[0]) == 1  # local maxima only
    # The weaker car's peak scores 0.7 against its neighbour's 0.9: a ratio above that loses it too.
    assert len(decode(out, GRID, STRIDE, score_threshold=0.5, peak_ratio=0.8)[0]) == 1
    with pytest.raises(ValueError, match="odd"):
        decode(out, GRID, STRIDE, peak_window=2)
    with pytest.raises(ValueError, match="peak_ratio"):
        decode(out, GRID, STRIDE, peak_ratio=1.5)


def test_duplicate_centres_go_and_neighbours_stay() -> None:
    # (x, y, z, l, w, h, yaw, score, label)
    candidates = torch.tensor([
        [0.0, 0.0, -1.0, 4.5, 1.9, 1.5, 0.0, 0.6, 0.0],  # duplicate of the next (0.5 m < 1.9 / 2)
        [0.3, 0.4, -1.0, 4.4, 1.8, 1.5, 0.1, 0.9, 0.0],
        [0.3, 2.4, -1.0, 4.5, 1.9, 1.5, 0.0, 0.5, 0.0],  # side by side, 2.0 m apart: another car
        [0.2, 0.3, -1.0, 0.6, 0.6, 1.7, 0.0, 0.4, 1.0],  # other class at the same place: kept
        [0.0, 2.6, -1.0, 4.5, 1.9, 1.5, 0.0, 0.45, 0.0],  # duplicate of row 2, not of row 1 (2.2 m)
        [0.0, 2.6, -1.0, 4.5, 1.9, 1.5, 0.0, 0.45, 0.0],  # its exact tie: also a duplicate of row 2
    ])
    kept = drop_duplicate_centres(candidates)
    torch.testing.assert_close(kept, candidates[[1, 2, 3]])
    assert drop_duplicate_centres(candidates[:1]).shape == (1, 9)
    assert drop_duplicate_centres(candidates[:0]).shape == (0, 9)


def test_targets_peak_at_centre_cell_with_radius_at_least_one() -> None:
    tiny = np.array([[0.1, 0.1, 0.0, 0.2, 0.2, 0.2, 0.0]])  # far smaller than a cell
    heatmap = build_targets([tiny], [np.array([0])], GRID, STRIDE, 1).heatmap[0, 0]  # [H', W']
    row = col = int(np.floor((0.1 + 16.0) / CELL_M))
    assert float(heatmap[row, col]) == 1.0
    neighbours = heatmap[row - 1 : row + 2, col - 1 : col + 2]
    assert torch.all(neighbours > 0.0) and int((heatmap > 0).sum()) == 9  # radius exactly 1


def test_gaussian_radius_keeps_min_overlap() -> None:
    for length, width in ((5.0, 2.5), (12.0, 3.0), (1.0, 1.0)):
        radius = gaussian_radius_cells(length, width, 0.7)
        # The same box shifted by the radius in x and y still overlaps by at least 0.7.
        intersection = (length - radius) * (width - radius)
        assert intersection / (2 * length * width - intersection) >= 0.7 - 1e-9
    assert gaussian_radius_cells(12.0, 3.0, 0.1) > gaussian_radius_cells(5.0, 2.5, 0.1)


def test_empty_ground_truth() -> None:
    torch.manual_seed(0)
    empty_boxes, empty_labels = np.zeros((0, 7)), np.zeros(0, dtype=np.int64)
    targets = build_targets([empty_boxes, empty_boxes], [empty_labels, empty_labels], GRID, STRIDE, 1)
    assert torch.count_nonzero(targets.heatmap) == 0
    assert targets.index.shape == (2, 0) and targets.offset.shape == (2, 0, 2)

    head = CenterHead(8, head_channels=16)
    losses = compute_loss(head(torch.randn(2, 8, ROWS, COLS)), targets)
    for name in ("offset", "z", "size", "yaw"):
        assert losses[name].item() == 0.0
    assert torch.isfinite(losses["total"])
    losses["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


def test_mixed_batch_pads_the_empty_sample() -> None:
    targets = build_targets([ROUND_TRIP_BOXES[:2], np.zeros((0, 7))], [ROUND_TRIP_LABELS[:2], []], GRID, STRIDE, 2)
    assert targets.mask.tolist() == [[True, True], [False, False]]
    assert torch.count_nonzero(targets.heatmap[1]) == 0


def test_empty_heatmap_decodes_to_nothing() -> None:
    zeros = torch.zeros(2, 1, ROWS, COLS)
    out = HeadOutput(heatmap=torch.full((2, 3, ROWS, COLS), -20.0), offset=zeros.repeat(1, 2, 1, 1), z=zeros,
                     size=zeros.repeat(1, 3, 1, 1), yaw=zeros.repeat(1, 2, 1, 1))
    detections = decode(out, GRID, STRIDE)
    assert [tuple(d.shape) for d in detections] == [(0, 9), (0, 9)]


def test_decode_rejects_mismatched_grid() -> None:
    zeros = torch.zeros(1, 1, 10, 10)
    out = HeadOutput(heatmap=zeros, offset=zeros.repeat(1, 2, 1, 1), z=zeros, size=zeros.repeat(1, 3, 1, 1),
                     yaw=zeros.repeat(1, 2, 1, 1))
    with pytest.raises(ValueError, match="heatmap"):
        decode(out, GRID, STRIDE)


def _box(x_m: float, y_m: float, length_m: float, width_m: float, yaw_rad: float) -> list[float]:
    return [x_m, y_m, 0.0, length_m, width_m, 1.5, yaw_rad]


def test_rotated_nms_keeps_the_higher_scoring_of_two_overlapping() -> None:
    boxes = torch.tensor([_box(0.0, 0.0, 4.0, 2.0, 0.3), _box(0.1, 0.05, 4.0, 2.0, 0.35)])
    assert rotated_nms(boxes, torch.tensor([0.6, 0.9]), 0.5).tolist() == [1]


def test_rotated_nms_keeps_disjoint_boxes_by_score() -> None:
    boxes = torch.tensor([_box(0.0, 0.0, 4.0, 2.0, 0.3), _box(10.0, 0.0, 4.0, 2.0, 2.0)])
    assert rotated_nms(boxes, torch.tensor([0.4, 0.8]), 0.1).tolist() == [1, 0]


def test_rotated_nms_threshold_on_hand_computed_iou() -> None:
    # A 4 x 2 box and itself turned 90 degrees: intersection 2 x 2 = 4, union 8 + 8 - 4 = 12,
    # IoU 1/3 (the yaw 0.7 turns both, which leaves the IoU unchanged).
    boxes = torch.tensor([_box(1.0, 2.0, 4.0, 2.0, 0.7), _box(1.0, 2.0, 4.0, 2.0, 0.7 + math.pi / 2)])
    scores = torch.tensor([0.9, 0.8])
    assert rotated_nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert rotated_nms(boxes, scores, 0.3).tolist() == [0]


def test_rotated_nms_of_nothing() -> None:
    kept = rotated_nms(torch.zeros(0, 7), torch.zeros(0), 0.5)
    assert kept.dtype == torch.int64 and kept.shape == (0,)


def test_heatmap_bias_gives_prior_of_one_tenth() -> None:
    torch.manual_seed(0)
    head = CenterHead(16, num_classes=3, head_channels=32)
    assert head.heatmap[-1].bias[0].item() == pytest.approx(-2.197, abs=1e-3)
    with torch.no_grad():
        probability = torch.sigmoid(head(torch.randn(2, 16, 24, 24)).heatmap)
    assert float(probability.mean()) == pytest.approx(0.1, abs=0.02)




def test_training_finds_two_boxes(one_thread: None) -> None:
    torch.manual_seed(0)
    grid = BevGrid(x_min_m=-8.0, x_max_m=8.0, y_min_m=-8.0, y_max_m=8.0, cell_size_m=0.4)  # 20 x 20 at stride 2
    boxes = np.array([[-3.3, 2.1, -1.0, 4.4, 1.9, 1.6, 0.4], [4.7, -3.5, -0.9, 4.0, 1.8, 1.5, -2.8]])
    targets = build_targets([boxes], [np.array([0, 0])], grid, STRIDE, 1)
    features = torch.randn(1, 8, 20, 20)
    head = CenterHead(8, head_channels=16)
    optimiser = torch.optim.Adam(head.parameters(), lr=3e-3)
    initial = compute_loss(head(features), targets)["total"].item()
    for _ in range(100):
        optimiser.zero_grad()
        loss = compute_loss(head(features), targets)["total"]
        loss.backward()
        optimiser.step()
    final = compute_loss(head(features), targets)["total"].item()
    assert final < 0.3 * initial

    head.eval()
    best_two = decode(head(features), grid, STRIDE)[0][:2]  # decode sorts by score
    for box in boxes:
        found = _nearest(best_two, box)
        assert np.hypot(found[0] - box[0], found[1] - box[1]) < CELL_M


def test_a_box_turned_by_pi_has_the_same_yaw_target() -> None:
    # Front and back of a box look alike: theta and theta + pi must not be two competing targets.
    box = np.array([[2.0, 3.0, 0.8, 4.5, 1.9, 1.5, 0.4]])
    turned = box.copy()
    turned[0, 6] += np.pi
    a = build_targets([box], [np.array([0])], GRID, STRIDE, 1)
    b = build_targets([turned], [np.array([0])], GRID, STRIDE, 1)
    torch.testing.assert_close(a.yaw, b.yaw, atol=1e-6, rtol=0.0)
    quarter = box.copy()
    quarter[0, 6] += np.pi / 2
    c = build_targets([quarter], [np.array([0])], GRID, STRIDE, 1)
    assert not torch.allclose(a.yaw, c.yaw, atol=1e-3)


def test_regressions_at_cells_equal_the_dense_head_everywhere_including_the_border() -> None:
    torch.manual_seed(3)
    head = CenterHead(8, num_classes=2, head_channels=12).eval()
    features = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        dense, peak = head(features), head.infer(features)
        assert torch.equal(dense.heatmap, peak.heatmap)
        every_cell = torch.arange(9 * 7)
        for b in range(2):
            torch.testing.assert_close(peak.at_cells(b, every_cell), dense.at_cells(b, every_cell),
                                       rtol=1e-5, atol=1e-5)
        assert peak.at_cells(0, torch.zeros(0, dtype=torch.int64)).shape == (0, 8)


def test_decoding_the_sparse_head_gives_the_dense_heads_boxes() -> None:
    torch.manual_seed(4)
    head = CenterHead(8, head_channels=12).eval()
    grid = BevGrid(x_min_m=-8.0, x_max_m=8.0, y_min_m=-8.0, y_max_m=8.0, cell_size_m=0.5)  # 16 x 16 at stride 2
    features = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        dense = decode(head(features), grid, 2, score_threshold=0.05)
        sparse = decode(head.infer(features), grid, 2, score_threshold=0.05)
    assert sum(len(d) for d in dense) > 4  # the random head does produce peaks to compare
    for d, s in zip(dense, sparse):
        torch.testing.assert_close(s, d, rtol=1e-5, atol=1e-5)


def test_rotated_nms_equals_greedy_suppression_over_the_full_iou_matrix() -> None:
    # rotated_nms computes only the IoUs a kept box needs; the result must be the textbook one.
    from models.boxes import bev_iou_matrix

    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(0, 80))
        boxes = np.zeros((n, 7))
        boxes[:, :2] = rng.uniform(-10, 10, (n, 2))
        boxes[:, 3], boxes[:, 4], boxes[:, 6] = rng.uniform(0.5, 6, n), rng.uniform(0.5, 3, n), rng.uniform(-3, 3, n)
        scores = rng.uniform(size=n)
        threshold = float(rng.choice([0.0, 0.1, 0.5]))
        order = np.argsort(-scores, kind="stable")
        iou = bev_iou_matrix(boxes[order], boxes[order])
        suppressed, kept = np.zeros(n, bool), []
        for i in range(n):
            if not suppressed[i]:
                kept.append(i)
                suppressed |= iou[i] > threshold
        got = rotated_nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold).numpy()
        assert np.array_equal(order[kept], got)
