"""Detection scoring: BEV average precision at rotated-IoU thresholds, as OPV2V computes it.

The one definition of detection AP in cpstream: per frame, detections are matched greedily
(highest score first) to ground truth by rotated BEV IoU; the TP/FP flags of all frames are
then ranked together by score and summarised with VOC-style all-point AP.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from models.boxes import bev_iou_matrix

__all__ = ["IOU_THRESHOLDS", "APAccumulator", "voc_ap"]

IOU_THRESHOLDS: tuple[float, ...] = (0.3, 0.5, 0.7)


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC-style all-point average precision (the area under the interpolated PR curve).

    Recall gets 0 prepended and 1 appended, precision 0 prepended and 0 appended; precision
    is made non-increasing from the right (each point takes the best precision at any higher
    recall); AP is the sum of ``(r[i] - r[i-1]) * p[i]`` over the points where recall changes.

    Args:
        recall: [K] recall after each ranked detection (non-decreasing).
        precision: [K] precision after each ranked detection.

    Returns:
        AP in [0, 1].
    """
    recall_ext = np.concatenate([[0.0], np.asarray(recall, dtype=np.float64), [1.0]])  # [K+2]
    precision_ext = np.concatenate([[0.0], np.asarray(precision, dtype=np.float64), [0.0]])
    precision_ext = np.maximum.accumulate(precision_ext[::-1])[::-1]  # [K+2]
    changed = np.flatnonzero(recall_ext[1:] != recall_ext[:-1]) + 1
    return float(np.sum((recall_ext[changed] - recall_ext[changed - 1]) * precision_ext[changed]))


def _as_rows(array: np.ndarray, min_columns: int) -> np.ndarray:
    """Returns ``array`` as float64 [K, >=min_columns]; an empty input of any shape is valid."""
    rows = np.asarray(array, dtype=np.float64)
    if rows.size == 0:
        return rows.reshape(0, max(min_columns, rows.shape[-1] if rows.ndim == 2 else 0))
    if rows.ndim != 2 or rows.shape[1] < min_columns:
        raise ValueError(f"expected an [N, >={min_columns}] array, got shape {rows.shape}")
    return rows


def _greedy_true_positives(iou: np.ndarray, threshold: float) -> np.ndarray:
    """Matches score-sorted detections (rows of ``iou`` [N, M]) to GT (columns) greedily.

    Each detection takes the not-yet-matched GT of highest IoU; it is a true positive when
    that IoU reaches ``threshold`` (the GT is then consumed), else a false positive.

    Returns:
        bool [N] true-positive flags.
    """
    is_tp = np.zeros(iou.shape[0], dtype=bool)  # [N]
    available = np.ones(iou.shape[1], dtype=bool)  # [M]
    for n in range(iou.shape[0]):
        if not available.any():
            break
        candidate_iou = np.where(available, iou[n], -1.0)  # [M]
        best = int(np.argmax(candidate_iou))
        if candidate_iou[best] >= threshold:
            is_tp[n] = True
            available[best] = False
    return is_tp


class APAccumulator:
    """Accumulates detections over frames and reports BEV AP per IoU threshold.

    Usage: call :meth:`add_frame` once per frame, then :meth:`result`. Detections are ranked
    globally by score across all frames (not frame by frame); ties keep the order of arrival.

    Edge cases of :meth:`result`, per threshold:
        * no ground truth and no detections in any frame: ``nan`` (nothing to score);
        * no ground truth but some detections: ``0.0`` (every detection is a false positive);
        * ground truth but no detections: ``0.0``.

    Args:
        iou_thresholds: BEV IoU thresholds at which a detection counts as a true positive.
    """

    def __init__(self, iou_thresholds: tuple[float, ...] = IOU_THRESHOLDS) -> None:
        self._iou_thresholds = tuple(float(t) for t in iou_thresholds)
        self._scores: list[np.ndarray] = []
        self._true_positives: dict[float, list[np.ndarray]] = {t: [] for t in self._iou_thresholds}
        self._frames = 0
        self._gt_count = 0

    @property
    def frames(self) -> int:
        """Number of frames added so far."""
        return self._frames

    @property
    def gt_count(self) -> int:
        """Number of ground-truth boxes added so far."""
        return self._gt_count

    def add_frame(self, det: np.ndarray, gt: np.ndarray) -> None:
        """Matches one frame's detections to its ground truth and stores the outcome.

        Args:
            det: [N, 8] detections ``(x, y, z, l, w, h, yaw_rad, score)``; N may be 0.
                Further columns (e.g. class) are ignored.
            gt: [M, >=7] ground-truth boxes in the same frame as ``det``; M may be 0.

        Raises:
            ValueError: If ``det`` or ``gt`` is not a 2D array with enough columns.
        """
        det = _as_rows(det, min_columns=8)  # [N, >=8]
        gt = _as_rows(gt, min_columns=7)  # [M, >=7]
        order = np.argsort(-det[:, 7], kind="stable")  # [N]
        det = det[order]
        iou = bev_iou_matrix(det[:, :7], gt[:, :7])  # [N, M]
        for threshold in self._iou_thresholds:
            self._true_positives[threshold].append(_greedy_true_positives(iou, threshold))
        self._scores.append(det[:, 7])
        self._frames += 1
        self._gt_count += gt.shape[0]

    def result(self) -> dict[str, float]:
        """Returns AP per threshold, keyed by the threshold as text (``"0.3"``, ...).

        See the class docstring for the edge cases.
        """
        scores = np.concatenate(self._scores) if self._scores else np.zeros(0)  # [D]
        order = np.argsort(-scores, kind="stable")  # [D]
        ap: dict[str, float] = {}
        for threshold in self._iou_thresholds:
            key = str(threshold)
            if self._gt_count == 0:
                ap[key] = float("nan") if scores.size == 0 else 0.0
                continue
            if scores.size == 0:
                ap[key] = 0.0
                continue
            is_tp = np.concatenate(self._true_positives[threshold])[order]  # [D]
            cum_tp = np.cumsum(is_tp)  # [D]
            cum_fp = np.cumsum(~is_tp)  # [D]
            ap[key] = voc_ap(cum_tp / self._gt_count, cum_tp / (cum_tp + cum_fp))
        return ap


MODA_RADIUS_M = 0.5
"""Ground-plane match radius of the multi-view pedestrian benchmarks (WILDTRACK, MultiviewX)."""


class ModaAccumulator:
    """MODA and MODP of ground-plane detections (people as points on the ground), over frames.

    Per frame, detections and ground truth are matched one to one by the Hungarian algorithm
    (``scipy.optimize.linear_sum_assignment``) on their ground-plane distance, pairs farther apart than
    ``radius_m`` not allowed (the CLEAR MOD protocol of the multi-view pedestrian benchmarks). Over all
    frames::

        MODA = 1 - (FP + FN) / GT          (negative when there are more errors than people)
        MODP = sum over matches of (1 - d / radius_m) / TP

    Edge cases of :meth:`result`: no ground truth in any frame gives MODA ``nan``; no match gives MODP ``nan``.
    """

    def __init__(self, radius_m: float = MODA_RADIUS_M) -> None:
        if radius_m <= 0:
            raise ValueError(f"match radius must be > 0 m, got {radius_m}")
        self.radius_m = float(radius_m)
        self.true_positives = self.false_positives = self.false_negatives = self.gt_count = self.frames = 0
        self._closeness = 0.0

    def add_frame(self, detections_xy: np.ndarray, gt_xy: np.ndarray) -> None:
        """Match one frame's detections ``[N, >=2]`` (x, y on the ground) to its people ``[M, >=2]``.

        Raises:
            ValueError: If either is not a 2D array with at least two columns, or holds NaN.
        """
        det = _as_rows(detections_xy, min_columns=2)[:, :2]
        gt = _as_rows(gt_xy, min_columns=2)[:, :2]
        if not (np.all(np.isfinite(det)) and np.all(np.isfinite(gt))):
            raise ValueError("detections and ground truth must be finite")
        matched = np.zeros(0)
        if len(det) and len(gt):
            distance = np.linalg.norm(det[:, None] - gt[None], axis=-1)  # [N, M]
            cost = np.where(distance <= self.radius_m, distance, 1e6)  # pairs out of reach: never preferred
            rows, cols = linear_sum_assignment(cost)
            matched = distance[rows, cols]
            matched = matched[matched <= self.radius_m]
        self.true_positives += len(matched)
        self.false_positives += len(det) - len(matched)
        self.false_negatives += len(gt) - len(matched)
        self.gt_count += len(gt)
        self.frames += 1
        self._closeness += float(np.sum(1.0 - matched / self.radius_m))

    def result(self) -> dict[str, float]:
        """``moda``, ``modp``, ``precision``, ``recall`` (fractions) and the counts."""
        tp, fp, fn = self.true_positives, self.false_positives, self.false_negatives
        return {
            "moda": 1.0 - (fp + fn) / self.gt_count if self.gt_count else float("nan"),
            "modp": self._closeness / tp if tp else float("nan"),
            "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / self.gt_count if self.gt_count else float("nan"),
            "tp": tp, "fp": fp, "fn": fn, "gt": self.gt_count, "frames": self.frames,
        }
