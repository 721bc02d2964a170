"""Centre-based detection head: class heat-maps plus per-cell box regressions on the BEV grid.

The head works on a feature map ``stride`` times coarser than the :class:`~models.bev.BevGrid`
(``H' = H / stride``, ``W' = W / stride``; rows along +y, columns along +x). Each object is a
peak in its class's heat-map at the strided cell holding its centre; that cell also regresses

* ``offset``: the centre's position relative to the cell centre, in strided cells (x, y),
  each in [-0.5, 0.5);
* ``z``: the centre height in metres;
* ``size``: ``log`` of (l, w, h) in metres;
* ``yaw``: (sin, cos) of *twice* the heading. A box looks the same turned by pi, so its
  heading is only defined modulo pi; doubling the angle makes theta and theta + pi one
  target (no averaging of two opposite answers) and leaves no discontinuity.

The pieces are kept apart: :class:`CenterHead` is the network, :func:`build_targets` turns
ground-truth boxes into :class:`HeadTargets`, :func:`compute_loss` compares the two, and
:func:`decode` turns a :class:`HeadOutput` into boxes, with :func:`rotated_nms` for overlaps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import shapely
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.bev import BevGrid
from models.boxes import box_corners_bev

__all__ = ["CenterHead", "HeadOutput", "HeadTargets", "PeakHeadOutput", "build_targets", "compute_loss", "decode",
           "gaussian_radius_cells", "rotated_nms"]

# Initial heat-map probability everywhere: a low prior keeps the many negative cells from
# swamping the focal loss in the first steps (bias = -log((1 - p) / p) = -2.197 for p = 0.1).
_HEATMAP_PRIOR = 0.1
# Regression target columns, in the order HeadTargets stores them.
_OFFSET, _Z, _SIZE, _YAW = slice(0, 2), slice(2, 3), slice(3, 6), slice(6, 8)
_REGRESSION_COLUMNS = 8
_REGRESSIONS = ("offset", "z", "size", "yaw")  # the branches behind those columns, in order
_MIN_SIZE_M = 1e-3  # guards log() against degenerate boxes


@dataclass(frozen=True, slots=True)
class HeadOutput:
    """Raw head predictions on the strided grid (see the module docstring for the encoding)."""

    heatmap: Tensor  # [B, K, H', W'] logits
    offset: Tensor  # [B, 2, H', W'] centre minus cell centre, strided cells (x, y)
    z: Tensor  # [B, 1, H', W'] centre height, m
    size: Tensor  # [B, 3, H', W'] log(l, w, h), m
    yaw: Tensor  # [B, 2, H', W'] sin(2 yaw), cos(2 yaw)

    def at_cells(self, b: int, cell: Tensor) -> Tensor:
        """Sample ``b``'s regressions at flat cells ``[N]`` as ``[N, 8]`` (offset, z, size, yaw)."""
        return torch.cat([_at_cells(getattr(self, name)[b], cell) for name in _REGRESSIONS], dim=1)


@dataclass(frozen=True, slots=True)
class PeakHeadOutput:
    """Inference output: the dense heat-map, and box regressions computed only at the cells asked for.

    A decoder needs the regressions at a few dozen peak cells out of thousands; the regression
    branches (four 3x3 convolutions over the whole map) are most of a dense head's cost. The
    numbers at a cell are those of :class:`HeadOutput` (the same convolution, evaluated there).
    """

    heatmap: Tensor  # [B, K, H', W'] logits
    shared: Tensor  # [B, head_channels, H', W'] the head's shared features
    head: CenterHead

    def at_cells(self, b: int, cell: Tensor) -> Tensor:
        """Sample ``b``'s regressions at flat cells ``[N]`` as ``[N, 8]`` (offset, z, size, yaw)."""
        return self.head.regress_at(self.shared[b], cell)


@dataclass(frozen=True, slots=True)
class HeadTargets:
    """Training targets for a batch; ``N`` is the most objects kept by any sample (may be 0).

    Samples with fewer objects are padded; padded slots have ``mask`` False and index 0.
    """

    heatmap: Tensor  # [B, K, H', W'] in [0, 1], exactly 1 at each object's centre cell
    index: Tensor  # [B, N] int64 centre cell, row * W' + col
    mask: Tensor  # [B, N] bool, True for real objects
    label: Tensor  # [B, N] int64 class
    offset: Tensor  # [B, N, 2] centre minus cell centre, strided cells
    z: Tensor  # [B, N, 1] m
    size: Tensor  # [B, N, 3] log(l, w, h), m
    yaw: Tensor  # [B, N, 2] sin(2 yaw), cos(2 yaw)

    def to(self, device: torch.device | str) -> HeadTargets:
        """Returns a copy with every tensor on ``device``."""
        return HeadTargets(*(getattr(self, field.name).to(device) for field in fields(self)))


def _branch(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """A small per-output branch: 3x3 conv + ReLU, then a 1x1 projection."""
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid_channels, out_channels, 1),
    )


class CenterHead(nn.Module):
    """Centre heat-map head with offset, height, size and yaw branches.

    Contract: ``forward(features [B, in_channels, H', W'])`` returns a :class:`HeadOutput` of
    the same spatial size; it knows nothing of the grid or stride (pass those to
    :func:`decode`). Training targets and the loss live outside, in :func:`build_targets`
    and :func:`compute_loss`.

    Args:
        in_channels: Channels of the incoming BEV features.
        num_classes: Number of heat-map classes K.
        head_channels: Width of the shared conv and of each branch.
    """

    def __init__(self, in_channels: int, *, num_classes: int = 1, head_channels: int = 64) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.shared = nn.Sequential(
            nn.Conv2d(in_channels, head_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(head_channels),
            nn.ReLU(inplace=True),
        )
        self.heatmap = _branch(head_channels, head_channels, num_classes)
        self.offset = _branch(head_channels, head_channels, 2)
        self.z = _branch(head_channels, head_channels, 1)
        self.size = _branch(head_channels, head_channels, 3)
        self.yaw = _branch(head_channels, head_channels, 2)
        nn.init.constant_(self.heatmap[-1].bias, -math.log((1.0 - _HEATMAP_PRIOR) / _HEATMAP_PRIOR))

    def forward(self, features: Tensor) -> HeadOutput:  # features: [B, C, H', W']
        shared = self.shared(features)  # [B, head_channels, H', W']
        return HeadOutput(
            heatmap=self.heatmap(shared),
            offset=self.offset(shared),
            z=self.z(shared),
            size=self.size(shared),
            yaw=self.yaw(shared),
        )

    def infer(self, features: Tensor) -> PeakHeadOutput:
        """Inference: the heat-map over the whole map; box regressions later, only where a decoder asks."""
        shared = self.shared(features)
        return PeakHeadOutput(heatmap=self.heatmap(shared), shared=shared, head=self)

    def regress_at(self, shared: Tensor, cell: Tensor) -> Tensor:
        """The regression branches of one sample's shared features ``[C, H', W']`` at flat cells ``[N]``.

        Each branch's 3x3 convolution (zero padding) is applied to the 3x3 neighbourhood of each
        cell only, as one matrix product; returns ``[N, 8]`` (offset, z, size, yaw).
        """
        channels, rows, cols = shared.shape
        padded = F.pad(shared, (1, 1, 1, 1))  # [C, H'+2, W'+2]
        step = torch.arange(3, device=cell.device)
        row = (cell // cols)[:, None, None] + step[None, :, None]  # [N, 3, 1] in padded rows
        col = (cell % cols)[:, None, None] + step[None, None, :]  # [N, 1, 3]
        patches = padded[:, row, col].permute(1, 0, 2, 3).reshape(len(cell), channels * 9)  # [N, C*3*3]
        outputs = []
        for name in _REGRESSIONS:
            conv, _, project = getattr(self, name)
            hidden = torch.relu(F.linear(patches, conv.weight.flatten(1), conv.bias))  # [N, mid]
            outputs.append(F.linear(hidden, project.weight.flatten(1), project.bias))  # [N, out]
        return torch.cat(outputs, dim=1)


# ---------------------------------------------------------------------------------------------
# Targets


def _strided_shape(grid: BevGrid, stride: int) -> tuple[int, int, float]:
    """Rows H', columns W' and the cell edge (m) of ``grid`` downsampled by ``stride``."""
    if stride < 1 or grid.height_cells % stride or grid.width_cells % stride:
        raise ValueError(f"stride {stride} must divide the grid's {grid.height_cells} x "
                         f"{grid.width_cells} cells")
    return grid.height_cells // stride, grid.width_cells // stride, grid.cell_size_m * stride


def _to_numpy(values: np.ndarray | Tensor, dtype: type) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def gaussian_radius_cells(length_cells: float, width_cells: float, min_overlap: float) -> float:
    """Largest centre error (cells) that still leaves a box with IoU >= ``min_overlap``.

    CenterNet's rule: the smallest radius over three ways a corner-shifted box can miss the
    ground truth (shifted by r in both axes at the same size; shrunk by r on every side;
    grown by r on every side). Each case is the smaller root of a quadratic in r.

    Args:
        length_cells: Box extent along one axis, in cells.
        width_cells: Box extent along the other axis, in cells.
        min_overlap: IoU to keep, in (0, 1).

    Returns:
        The radius in cells (not rounded, not clamped).
    """
    a, b, o = length_cells, width_cells, min_overlap
    perimeter_half = a + b
    area = a * b
    # Same size, shifted by r in both axes: (1 + o)(a - r)(b - r) >= 2 o a b.
    shifted = (perimeter_half - math.sqrt(perimeter_half**2 - 4 * area * (1 - o) / (1 + o))) / 2
    # Shrunk by r on every side: (a - 2r)(b - 2r) >= o a b.
    shrunk = (perimeter_half - math.sqrt(perimeter_half**2 - 4 * area * (1 - o))) / 4
    # Grown by r on every side: a b >= o (a + 2r)(b + 2r).
    grown = (-perimeter_half + math.sqrt(perimeter_half**2 + 4 * area * (1 - o) / o)) / 4
    return min(shifted, shrunk, grown)


def _draw_gaussian(heatmap: np.ndarray, row: int, col: int, radius: int) -> None:
    """Raises ``heatmap`` [H', W'] in place to a Gaussian peak of 1 at (row, col)."""
    sigma = (2 * radius + 1) / 6.0
    steps = np.arange(-radius, radius + 1, dtype=np.float64)  # [2r+1]
    gaussian = np.exp(-(steps[:, None] ** 2 + steps[None, :] ** 2) / (2 * sigma**2))  # [2r+1, 2r+1]
    rows, cols = heatmap.shape
    top, bottom = min(row, radius), min(rows - row, radius + 1)
    left, right = min(col, radius), min(cols - col, radius + 1)
    window = heatmap[row - top : row + bottom, col - left : col + right]
    patch = gaussian[radius - top : radius + bottom, radius - left : radius + right]
    np.maximum(window, patch, out=window)


def _sample_targets(
    boxes: np.ndarray,  # [M, 7]
    labels: np.ndarray,  # [M]
    grid: BevGrid,
    stride: int,
    num_classes: int,
    min_overlap: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One sample's heat-map [K, H', W'], centre index [n], regression [n, 8] and labels [n]."""
    rows, cols, cell_m = _strided_shape(grid, stride)
    heatmap = np.zeros((num_classes, rows, cols), dtype=np.float32)
    u = (boxes[:, 0] - grid.x_min_m) / cell_m  # [M] strided columns
    v = (boxes[:, 1] - grid.y_min_m) / cell_m  # [M] strided rows
    col, row = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)  # [M]
    inside = (col >= 0) & (col < cols) & (row >= 0) & (row < rows)  # [M]
    boxes, labels, u, v, col, row = (a[inside] for a in (boxes, labels, u, v, col, row))
    for n in range(boxes.shape[0]):
        radius = gaussian_radius_cells(boxes[n, 3] / cell_m, boxes[n, 4] / cell_m, min_overlap)
        _draw_gaussian(heatmap[labels[n]], int(row[n]), int(col[n]), max(1, int(radius)))
    regression = np.empty((boxes.shape[0], _REGRESSION_COLUMNS), dtype=np.float64)  # [n, 8]
    regression[:, _OFFSET] = np.stack([u - col - 0.5, v - row - 0.5], axis=-1)
    regression[:, _Z] = boxes[:, 2:3]
    regression[:, _SIZE] = np.log(np.maximum(boxes[:, 3:6], _MIN_SIZE_M))
    regression[:, _YAW] = np.stack([np.sin(2 * boxes[:, 6]), np.cos(2 * boxes[:, 6])], axis=-1)
    return heatmap, row * cols + col, regression, labels


def build_targets(
    boxes: Sequence[np.ndarray | Tensor],
    labels: Sequence[np.ndarray | Tensor],
    grid: BevGrid,
    stride: int,
    num_classes: int,
    *,
    min_overlap: float = 0.1,
) -> HeadTargets:
    """Encodes ground-truth boxes as head targets on the grid downsampled by ``stride``.

    Each box whose centre lies inside the grid adds a Gaussian (peak 1, radius from its
    footprint in strided cells by :func:`gaussian_radius_cells`, at least 1) to its class's
    heat-map at its centre cell, and the regression targets at that cell. Boxes centred
    outside the grid are skipped. Two boxes in one cell both keep their regression slots.

    Args:
        boxes: Per sample, [M, >=7] boxes (x, y, z, l, w, h, yaw_rad) in the grid's frame;
            M may be 0. Columns after the seventh are ignored.
        labels: Per sample, [M] integer classes in [0, num_classes).
        grid: The full-resolution BEV grid.
        stride: Downsampling from ``grid`` to the head's feature map.
        num_classes: Number of heat-map classes K.
        min_overlap: IoU that the Gaussian radius is sized to keep.

    Returns:
        CPU float32 targets (see :class:`HeadTargets`); use ``.to(device)`` to move them.

    Raises:
        ValueError: When boxes and labels disagree in number, a label is out of range, or
            ``stride`` does not divide the grid.
    """
    if len(boxes) != len(labels):
        raise ValueError(f"got {len(boxes)} box arrays but {len(labels)} label arrays")
    samples = []
    for sample_boxes, sample_labels in zip(boxes, labels, strict=True):
        box_array = _to_numpy(sample_boxes, np.float64)
        box_array = box_array.reshape(0, 7) if box_array.size == 0 else box_array[:, :7]  # [M, 7]
        label_array = _to_numpy(sample_labels, np.int64).reshape(-1)  # [M]
        if label_array.shape[0] != box_array.shape[0] or np.any((label_array < 0) | (label_array >= num_classes)):
            raise ValueError(f"labels {label_array.tolist()} must be {box_array.shape[0]} classes "
                             f"in [0, {num_classes})")
        samples.append(_sample_targets(box_array, label_array, grid, stride, num_classes, min_overlap))
    return _stack_samples(samples)


def _stack_samples(samples: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> HeadTargets:
    """Pads per-sample targets to the batch's largest object count and stacks them."""
    slots = max((len(index) for _, index, _, _ in samples), default=0)
    batch = len(samples)
    index = np.zeros((batch, slots), dtype=np.int64)  # [B, N]
    mask = np.zeros((batch, slots), dtype=bool)  # [B, N]
    label = np.zeros((batch, slots), dtype=np.int64)  # [B, N]
    regression = np.zeros((batch, slots, _REGRESSION_COLUMNS), dtype=np.float32)  # [B, N, 8]
    for b, (_, sample_index, sample_regression, sample_label) in enumerate(samples):
        count = len(sample_index)
        index[b, :count], mask[b, :count], label[b, :count] = sample_index, True, sample_label
        regression[b, :count] = sample_regression
    regression_t = torch.from_numpy(regression)
    return HeadTargets(
        heatmap=torch.from_numpy(np.stack([heatmap for heatmap, _, _, _ in samples])),
        index=torch.from_numpy(index),
        mask=torch.from_numpy(mask),
        label=torch.from_numpy(label),
        offset=regression_t[..., _OFFSET],
        z=regression_t[..., _Z],
        size=regression_t[..., _SIZE],
        yaw=regression_t[..., _YAW],
    )


# ---------------------------------------------------------------------------------------------
# Loss


def _focal_loss(logits: Tensor, target: Tensor, alpha: float, beta: float) -> Tensor:
    """CenterNet's penalty-reduced focal loss, summed and divided by the positives (>= 1).

    Cells with target exactly 1 are positives; every other cell is a negative whose penalty
    is scaled down by ``(1 - target) ** beta`` near an object.
    """
    probability = torch.sigmoid(logits)  # [B, K, H', W']
    positive = target.eq(1.0)  # [B, K, H', W']
    # logsigmoid keeps log(p) and log(1 - p) finite for saturated logits.
    positive_loss = (1 - probability).pow(alpha) * F.logsigmoid(logits)
    negative_loss = (1 - target).pow(beta) * probability.pow(alpha) * F.logsigmoid(-logits)
    loss = -torch.where(positive, positive_loss, negative_loss).sum()
    return loss / positive.sum().clamp(min=1)


def _masked_l1(prediction: Tensor, index: Tensor, mask: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error at the objects' centre cells (0 without objects, still in the graph).

    Args:
        prediction: [B, C, H', W'] dense prediction.
        index: [B, N] centre cells.
        mask: [B, N] real-object flags.
        target: [B, N, C] targets.
    """
    flat = prediction.flatten(2)  # [B, C, H'W']
    gathered = flat.gather(2, index[:, None, :].expand(-1, flat.shape[1], -1)).transpose(1, 2)  # [B, N, C]
    error = (gathered - target).abs() * mask[..., None]  # [B, N, C]
    return error.sum() / (mask.sum().clamp(min=1) * prediction.shape[1])


def compute_loss(
    out: HeadOutput,
    targets: HeadTargets,
    *,
    heatmap_weight: float = 1.0,
    offset_weight: float = 1.0,
    z_weight: float = 1.0,
    size_weight: float = 1.0,
    yaw_weight: float = 1.0,
    focal_alpha: float = 2.0,
    focal_beta: float = 4.0,
) -> dict[str, Tensor]:
    """Detection loss of a head output against its targets (on the output's device).

    Args:
        out: The head's prediction.
        targets: From :func:`build_targets`, on the same device as ``out``.
        heatmap_weight, offset_weight, z_weight, size_weight, yaw_weight: Weights of each
            term in ``total``.
        focal_alpha, focal_beta: Focal-loss exponents (CenterNet's 2 and 4).

    Returns:
        Scalar tensors: ``heatmap`` (focal loss per positive cell), ``offset``, ``z``,
        ``size`` and ``yaw`` (L1 per element at the object cells; 0 when there are no
        objects) and their weighted sum ``total``.
    """
    terms = {
        "heatmap": _focal_loss(out.heatmap, targets.heatmap, focal_alpha, focal_beta),
        "offset": _masked_l1(out.offset, targets.index, targets.mask, targets.offset),
        "z": _masked_l1(out.z, targets.index, targets.mask, targets.z),
        "size": _masked_l1(out.size, targets.index, targets.mask, targets.size),
        "yaw": _masked_l1(out.yaw, targets.index, targets.mask, targets.yaw),
    }
    weights = {"heatmap": heatmap_weight, "offset": offset_weight, "z": z_weight, "size": size_weight,
               "yaw": yaw_weight}
    terms["total"] = sum((weights[name] * term for name, term in terms.items()), torch.zeros_like(terms["heatmap"]))
    return terms


# ---------------------------------------------------------------------------------------------
# Decoding


def rotated_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression with rotated BEV IoU.

    Boxes are visited by descending score; each kept box suppresses every later box whose
    IoU with it exceeds ``iou_threshold``. IoUs are computed on the CPU (shapely), and only those a
    kept box needs: with its later, not yet suppressed boxes whose footprints' bounds meet (a
    decoder's candidates are mostly a few cells around each object, suppressed by the first).

    Args:
        boxes: [N, >=7] boxes (x, y, z, l, w, h, yaw_rad); N may be 0.
        scores: [N] scores.
        iou_threshold: IoU above which a lower-scoring box is dropped.

    Returns:
        int64 [K] indices into ``boxes`` of the kept boxes, by descending score, on
        ``scores``' device.
    """
    order = torch.argsort(scores.detach().cpu(), descending=True, stable=True).numpy()  # [N]
    ordered_boxes = boxes.detach().cpu().double().numpy().reshape(-1, boxes.shape[-1])[order]  # [N, >=7]
    suppressed = np.zeros(order.shape[0], dtype=bool)  # [N]
    kept = []
    if order.shape[0]:
        polygons = shapely.polygons(box_corners_bev(ordered_boxes))  # [N]
        area = ordered_boxes[:, 3] * ordered_boxes[:, 4]  # [N]
        first, second = shapely.STRtree(polygons).query(polygons, predicate="intersects")
        later = first < second
        first, second = first[later], second[later]
        by_first = np.lexsort((second, first))
        first, second = first[by_first], second[by_first]
        starts = np.searchsorted(first, np.arange(order.shape[0] + 1)) if first.size else None
    for i in range(order.shape[0]):
        if suppressed[i]:
            continue
        kept.append(i)
        if starts is None:
            continue
        others = second[starts[i]:starts[i + 1]]
        others = others[~suppressed[others]]
        if others.size == 0:
            continue
        intersection = shapely.area(shapely.intersection(polygons[i], polygons[others]))
        union = area[i] + area[others] - intersection
        iou = np.where(union > 0.0, intersection / np.where(union > 0.0, union, 1.0), 0.0)
        suppressed[others[iou > iou_threshold]] = True
    return torch.as_tensor(order[kept], dtype=torch.int64, device=scores.device).reshape(-1)


def _peak_scores(heatmap: Tensor, window: int = 3, ratio: float = 1.0) -> Tensor:
    """Sigmoid heat-map [B, K, H', W'] with every cell below ``ratio`` times the maximum of its ``window`` x
    ``window`` neighbourhood zeroed (``ratio`` 1: local maxima only; ``window`` 1: every cell kept)."""
    probability = torch.sigmoid(heatmap)
    if window <= 1 or ratio <= 0.0:
        return probability
    neighbourhood_max = F.max_pool2d(probability, kernel_size=window, stride=1, padding=window // 2)
    if ratio >= 1.0:
        return probability * (probability == neighbourhood_max)
    return probability * (probability >= ratio * neighbourhood_max)


def _at_cells(dense: Tensor, cell: Tensor) -> Tensor:
    """Values of one sample's map [C, H', W'] at flat cells [N], as [N, C]."""
    return dense.flatten(1)[:, cell].T


def _sample_candidates(
    out: HeadOutput | PeakHeadOutput, peaks: Tensor, b: int, grid: BevGrid, cell_m: float, score_threshold: float,
    top_k: int
) -> Tensor:
    """The ``top_k`` best peaks of sample ``b`` above the threshold, decoded to [N, 9]."""
    _, rows, cols = peaks.shape[1:]
    top_scores, top_index = peaks[b].flatten().topk(min(top_k, peaks[b].numel()))  # [k]
    keep = top_scores > score_threshold
    top_scores, top_index = top_scores[keep], top_index[keep]  # [N]
    label, cell = top_index // (rows * cols), top_index % (rows * cols)  # [N]
    regression = out.at_cells(b, cell)  # [N, 8]
    offset, yaw = regression[:, _OFFSET], regression[:, _YAW]  # [N, 2] each
    x = grid.x_min_m + ((cell % cols) + 0.5 + offset[:, 0]) * cell_m  # [N]
    y = grid.y_min_m + ((cell // cols) + 0.5 + offset[:, 1]) * cell_m  # [N]
    return torch.cat([
        x[:, None], y[:, None], regression[:, _Z], regression[:, _SIZE].exp(),
        0.5 * torch.atan2(yaw[:, 0], yaw[:, 1])[:, None], top_scores[:, None], label[:, None].to(top_scores.dtype),
    ], dim=1)  # [N, 9]


def _nms_per_class(detections: Tensor, iou_threshold: float) -> Tensor:
    """Rotated NMS within each class of ``detections`` [N, 9]; result sorted by score."""
    kept = [torch.zeros(0, dtype=torch.int64, device=detections.device)]
    for label in torch.unique(detections[:, 8]):
        members = torch.nonzero(detections[:, 8] == label).flatten()  # [n]
        kept.append(members[rotated_nms(detections[members, :7], detections[members, 7], iou_threshold)])
    survivors = detections[torch.cat(kept)]  # [N', 9]
    return survivors[torch.argsort(survivors[:, 7], descending=True, stable=True)]


CANDIDATES_PER_DETECTION = 4
"""Without the strict local-maximum rule, cells decoded before NMS per box returned (an object lights up several)."""


def drop_duplicate_centres(detections: Tensor) -> Tensor:
    """Drops each box whose centre lies within half a box width of a higher-scoring box of its class.

    When more than an object's peak cell is a candidate, the cells around it decode (cell + offset) to
    nearly the same centre; two distinct objects' centres are at least about a width apart (side-by-side
    cars do not overlap). A distance test over all pairs (CenterPoint's circle NMS, without its sequential
    pass: a box goes when any higher-scoring box is that close) removes those duplicates in a few
    tensor operations, so the exact rotated NMS that follows sees about one candidate per object.

    Args:
        detections: [N, 9] decoded candidates (x, y, z, l, w, h, yaw, score, label).

    Returns:
        The surviving rows [N', 9], in their input order.
    """
    if detections.shape[0] < 2:
        return detections
    order = torch.argsort(detections[:, 7], descending=True, stable=True)
    ranked = detections[order]  # [N, 9] by descending score
    squared_distance = (ranked[:, None, :2] - ranked[None, :, :2]).square().sum(dim=2)  # [N, N]
    radius = 0.5 * torch.minimum(ranked[:, None, 4], ranked[None, :, 4])  # [N, N]
    same_class = ranked[:, None, 8] == ranked[None, :, 8]  # [N, N]
    rank = torch.arange(ranked.shape[0], device=ranked.device)
    ahead = rank[:, None] < rank[None, :]  # [N, N]: row i scores above column j
    duplicate = (ahead & same_class & (squared_distance < radius.square())).any(dim=0)  # [N]
    survivors = torch.zeros(detections.shape[0], dtype=torch.bool, device=detections.device)
    survivors[order[~duplicate]] = True
    return detections[survivors]


@torch.no_grad()
def decode(
    out: HeadOutput | PeakHeadOutput,
    grid: BevGrid,
    stride: int,
    *,
    score_threshold: float = 0.1,
    max_detections: int = 100,
    nms_iou_threshold: float = 0.1,
    peak_window: int = 3,
    peak_ratio: float = 0.5,
) -> list[Tensor]:
    """Turns head outputs into scored boxes in the grid's frame.

    Per sample: the cells of the sigmoid heat-map that score at least ``peak_ratio`` times the maximum
    of their ``peak_window`` window; the ``max_detections`` best above ``score_threshold`` (with
    ``peak_ratio`` 1, the local maxima; otherwise ``CANDIDATES_PER_DETECTION`` times as many), centre =
    cell centre + offset, size = exp, yaw = atan2(sin, cos) / 2; then (``peak_ratio`` below 1) candidates
    centred on a better one of their class dropped, rotated NMS within each class, and the
    ``max_detections`` best.

    The strict local-maximum rule (``peak_ratio`` 1, CenterNet's) on 2 m cells drops one of two cars
    parked side by side, 2-4 m apart: the weaker one's peak is the stronger one's neighbour. A halo cell
    of one object scores a fraction of its peak, while a neighbouring object's peak scores about as
    high as it, so keeping cells near their neighbourhood's maximum finds both; the decoded centres
    (:func:`drop_duplicate_centres`) and rotated NMS then decide which candidates are one object.

    Args:
        out: Head output for a batch.
        grid: The full-resolution BEV grid the features came from.
        stride: Downsampling from ``grid`` to the head's feature map.
        score_threshold: Peaks scoring at or below this are dropped.
        max_detections: Most boxes returned per sample.
        nms_iou_threshold: Rotated BEV IoU above which a lower-scoring box of the same class
            is suppressed.
        peak_window: Odd window of the peak rule on the heat-map; 1 keeps every cell.
        peak_ratio: A cell is a candidate when it scores at least this times its window's maximum
            (1: local maxima only; 0: every cell).

    Returns:
        Per sample, a [N, 9] tensor (x, y, z, l, w, h, yaw_rad, score, label) sorted by
        descending score, with yaw in [-pi/2, pi/2] (a box's heading modulo pi) and the label as a float.

    Raises:
        ValueError: When the heat-map's size does not match ``grid`` and ``stride``.
    """
    rows, cols, cell_m = _strided_shape(grid, stride)
    if tuple(out.heatmap.shape[2:]) != (rows, cols):
        raise ValueError(f"heatmap is {tuple(out.heatmap.shape[2:])} cells but the grid at stride "
                         f"{stride} is {(rows, cols)}")
    if peak_window < 1 or peak_window % 2 == 0:
        raise ValueError(f"peak_window must be a positive odd number of cells, got {peak_window}")
    if not 0.0 <= peak_ratio <= 1.0:
        raise ValueError(f"peak_ratio must be in [0, 1], got {peak_ratio}")
    peaks = _peak_scores(out.heatmap, peak_window, peak_ratio)  # [B, K, H', W']
    strict = peak_window > 1 and peak_ratio >= 1.0  # one candidate per local maximum
    top_k = max_detections if strict else CANDIDATES_PER_DETECTION * max_detections
    detections = []
    for b in range(peaks.shape[0]):
        candidates = _sample_candidates(out, peaks, b, grid, cell_m, score_threshold, top_k)
        if not strict:
            candidates = drop_duplicate_centres(candidates)
        detections.append(_nms_per_class(candidates, nms_iou_threshold)[:max_detections])
    return detections
