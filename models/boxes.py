"""Operations on upright 3D boxes: corners, point membership and rotated BEV IoU.

Boxes are ``[N, >=7]`` float arrays ``(x, y, z, l, w, h, yaw_rad, ...)``: ``(x, y, z)`` is the
centre, ``l`` runs along the box's heading (its local x axis), ``w`` along local y, ``h``
along z, and ``yaw_rad`` turns the box about +z. Extra columns are ignored here.
"""

from __future__ import annotations

import numpy as np
import shapely

__all__ = [
    "bev_iou_matrix",
    "box_corners_3d",
    "box_corners_bev",
    "count_points_in_boxes",
    "points_in_boxes",
]

# Corner order in the box frame, counter-clockwise seen from above:
# front-left, rear-left, rear-right, front-right.
_BEV_CORNER_SIGNS = np.array([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])  # [4, 2]


def _as_boxes(boxes: np.ndarray) -> np.ndarray:
    """Returns ``boxes`` as a 2D float64 array; an empty input of any shape becomes [0, 7]."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0 and array.ndim != 2:
        return array.reshape(0, 7)
    return array


def box_corners_bev(boxes: np.ndarray) -> np.ndarray:
    """Computes each box's footprint corners on the ground plane.

    Args:
        boxes: [N, >=7] boxes; N may be 0.

    Returns:
        float64 [N, 4, 2] xy corners, counter-clockwise seen from above, starting at the
        front-left corner (front = +l/2 along the heading, left = +w/2).
    """
    boxes = _as_boxes(boxes)
    local = boxes[:, None, 3:5] * 0.5 * _BEV_CORNER_SIGNS[None]  # [N, 4, 2]
    cos_yaw = np.cos(boxes[:, 6])[:, None]  # [N, 1]
    sin_yaw = np.sin(boxes[:, 6])[:, None]  # [N, 1]
    x = local[..., 0] * cos_yaw - local[..., 1] * sin_yaw + boxes[:, 0:1]  # [N, 4]
    y = local[..., 0] * sin_yaw + local[..., 1] * cos_yaw + boxes[:, 1:2]  # [N, 4]
    return np.stack([x, y], axis=-1)


def box_corners_3d(boxes: np.ndarray) -> np.ndarray:
    """Computes each box's eight corners.

    Args:
        boxes: [N, >=7] boxes; N may be 0.

    Returns:
        float64 [N, 8, 3]: corners 0-3 are the bottom face (z - h/2) and 4-7 the top face
        (z + h/2), each in the order of :func:`box_corners_bev`; corner ``k + 4`` lies
        above corner ``k``.
    """
    boxes = _as_boxes(boxes)
    bev = box_corners_bev(boxes)  # [N, 4, 2]
    half_h = boxes[:, 5:6] * 0.5  # [N, 1]
    z_bottom = np.broadcast_to(boxes[:, 2:3] - half_h, bev.shape[:2])[..., None]  # [N, 4, 1]
    z_top = np.broadcast_to(boxes[:, 2:3] + half_h, bev.shape[:2])[..., None]  # [N, 4, 1]
    bottom = np.concatenate([bev, z_bottom], axis=-1)  # [N, 4, 3]
    top = np.concatenate([bev, z_top], axis=-1)  # [N, 4, 3]
    return np.concatenate([bottom, top], axis=1)


def _inside_box(points_xyz: np.ndarray, box: np.ndarray, half_lwh: np.ndarray) -> np.ndarray:
    """Exact membership test of points [P, 3] in one box; ``half_lwh`` includes the margin."""
    dx = points_xyz[:, 0] - box[0]  # [P]
    dy = points_xyz[:, 1] - box[1]  # [P]
    cos_yaw, sin_yaw = np.cos(box[6]), np.sin(box[6])
    # Rotate the offset by -yaw into the box frame.
    local_x = dx * cos_yaw + dy * sin_yaw  # [P]
    local_y = -dx * sin_yaw + dy * cos_yaw  # [P]
    return (
        (np.abs(local_x) <= half_lwh[0])
        & (np.abs(local_y) <= half_lwh[1])
        & (np.abs(points_xyz[:, 2] - box[2]) <= half_lwh[2])
    )


def points_in_boxes(points: np.ndarray, boxes: np.ndarray, margin_m: float = 0.0) -> np.ndarray:
    """Tests which points lie in which boxes.

    A point is inside a box when, in the box frame (yaw about z only),
    ``|x| <= l/2 + margin``, ``|y| <= w/2 + margin`` and ``|z| <= h/2 + margin``.
    Points are sorted by x once and each box tests only those within its bounding circle's
    x range, so 60k points against 150 boxes take a few milliseconds.

    Args:
        points: [P, >=3] points, xyz first; P may be 0.
        boxes: [N, >=7] boxes in the same frame; N may be 0.
        margin_m: Grows (or, if negative, shrinks) every box on all sides, in metres.

    Returns:
        bool [P, N]; entry (p, n) is True when point p is inside box n.
    """
    points_xyz = np.asarray(points, dtype=np.float64)
    if points_xyz.size == 0 and points_xyz.ndim != 2:
        points_xyz = points_xyz.reshape(0, 3)
    points_xyz = points_xyz[:, :3]  # [P, 3]
    boxes = _as_boxes(boxes)
    inside = np.zeros((points_xyz.shape[0], boxes.shape[0]), dtype=bool)  # [P, N]
    if inside.size == 0:
        return inside
    half_lwh = boxes[:, 3:6] * 0.5 + margin_m  # [N, 3]
    radius_m = np.hypot(half_lwh[:, 0], half_lwh[:, 1])  # [N]
    order = np.argsort(points_xyz[:, 0], kind="stable")  # [P]
    sorted_x = points_xyz[order, 0]  # [P]
    first = np.searchsorted(sorted_x, boxes[:, 0] - radius_m, side="left")  # [N]
    last = np.searchsorted(sorted_x, boxes[:, 0] + radius_m, side="right")  # [N]
    for n in range(boxes.shape[0]):
        candidates = order[first[n] : last[n]]  # [K]
        if candidates.size:
            inside[candidates, n] = _inside_box(points_xyz[candidates], boxes[n], half_lwh[n])
    return inside


def count_points_in_boxes(
    points: np.ndarray, boxes: np.ndarray, margin_m: float = 0.0
) -> np.ndarray:
    """Counts the points inside each box (see :func:`points_in_boxes` for the rule).

    Args:
        points: [P, >=3] points; P may be 0.
        boxes: [N, >=7] boxes in the same frame; N may be 0.
        margin_m: Grows every box on all sides, in metres.

    Returns:
        int64 [N] point counts.
    """
    return points_in_boxes(points, boxes, margin_m).sum(axis=0, dtype=np.int64)


def bev_iou_matrix(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Rotated intersection-over-union of box footprints seen from above (z and h ignored).

    Only pairs whose footprints intersect (found with an STRtree) are computed exactly;
    all other entries are 0. Degenerate boxes (zero area) have IoU 0 with everything.

    Args:
        boxes_a: [N, >=7] boxes; N may be 0.
        boxes_b: [M, >=7] boxes in the same frame; M may be 0.

    Returns:
        float64 [N, M] IoU in [0, 1].
    """
    boxes_a, boxes_b = _as_boxes(boxes_a), _as_boxes(boxes_b)
    iou = np.zeros((boxes_a.shape[0], boxes_b.shape[0]), dtype=np.float64)  # [N, M]
    if iou.size == 0:
        return iou
    polygons_a = shapely.polygons(box_corners_bev(boxes_a))  # [N]
    polygons_b = shapely.polygons(box_corners_bev(boxes_b))  # [M]
    index_a, index_b = shapely.STRtree(polygons_b).query(polygons_a, predicate="intersects")
    if index_a.size == 0:
        return iou
    intersection = shapely.area(shapely.intersection(polygons_a[index_a], polygons_b[index_b]))
    area_a = boxes_a[:, 3] * boxes_a[:, 4]  # [N]
    area_b = boxes_b[:, 3] * boxes_b[:, 4]  # [M]
    union = area_a[index_a] + area_b[index_b] - intersection  # [K]
    safe_union = np.where(union > 0.0, union, 1.0)
    iou[index_a, index_b] = np.clip(np.where(union > 0.0, intersection / safe_union, 0.0), 0, 1)
    return iou
