"""A street grid with buildings: the static part of the synthetic world.

Intersections sit on a square grid ``block_pitch_m`` apart. Every street has
one driving lane per direction (right-hand traffic), a parking strip on each
side, a kerb and a pavement; buildings fill the blocks' edges and occlude the
cross streets at every corner.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agents.world.config import TownConfig

LANE_OFFSET_M = 1.75
"""Lane centre from the street centre line."""
PARKING_OFFSET_M = 4.8
"""Parked-car centre from the street centre line."""
KERB_M = 6.0
"""Half width of the carriageway."""
PAVEMENT_OFFSET_M = 7.5
"""Pedestrian path from the street centre line."""
PLOT_START_M = 9.5
"""Buildings start this far from the street centre line."""
INTERSECTION_HALF_M = 7.0
"""Lanes end this far before an intersection's centre."""


@dataclass(frozen=True, slots=True)
class Town:
    """Static geometry.

    Attributes:
        node_xy: ``[K, 2]`` intersection centres (m, world frame).
        grid_n: intersections per side (``K == grid_n**2``).
        pitch_m: distance between neighbouring intersections.
        buildings: ``[B, 7]`` boxes (x, y, z, l, w, h, yaw) of the buildings.
    """

    node_xy: np.ndarray  # [K, 2]
    grid_n: int
    pitch_m: float
    buildings: np.ndarray  # [B, 7]

    @property
    def extent_m(self) -> tuple[float, float]:
        """Min and max coordinate of the intersection grid (same on x and y)."""
        return float(self.node_xy[:, 0].min()), float(self.node_xy[:, 0].max())

    def neighbours(self, node: int) -> list[int]:
        """Intersections joined to ``node`` by a street."""
        i, j = divmod(node, self.grid_n)
        out = []
        for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            if 0 <= i + di < self.grid_n and 0 <= j + dj < self.grid_n:
                out.append((i + di) * self.grid_n + (j + dj))
        return out

    def street_offset_m(self, xy: np.ndarray) -> np.ndarray:
        """Distance of each point ``[N, 2]`` to the nearest street centre line."""
        lo, hi = self.extent_m
        rel = (xy - lo) / self.pitch_m
        dist = np.abs(rel - np.round(rel)) * self.pitch_m  # [N, 2]
        inside = (xy >= lo - KERB_M) & (xy <= hi + KERB_M)
        # A street along x runs at a fixed y (and vice versa); it exists only inside the grid.
        along_x = np.where(inside[:, 0], dist[:, 1], np.inf)
        along_y = np.where(inside[:, 1], dist[:, 0], np.inf)
        return np.minimum(along_x, along_y)


def build_town(config: TownConfig, rng: np.random.Generator) -> Town:
    """Lay out the grid and fill every block's edges with buildings."""
    grid_n = config.blocks + 1
    coords = (np.arange(grid_n) - config.blocks / 2) * config.block_pitch_m
    gx, gy = np.meshgrid(coords, coords, indexing="ij")
    node_xy = np.stack([gx.ravel(), gy.ravel()], axis=1)
    buildings = []
    for bx in coords[:-1]:
        for by in coords[:-1]:
            x0, y0 = bx + PLOT_START_M, by + PLOT_START_M
            x1, y1 = bx + config.block_pitch_m - PLOT_START_M, by + config.block_pitch_m - PLOT_START_M
            buildings.extend(_fill_block(x0, y0, x1, y1, config, rng))
    return Town(node_xy=node_xy, grid_n=grid_n, pitch_m=config.block_pitch_m,
                buildings=np.asarray(buildings, dtype=np.float64).reshape(-1, 7))


def _fill_block(x0: float, y0: float, x1: float, y1: float, config: TownConfig,
                rng: np.random.Generator) -> list[list[float]]:
    """Buildings along the four edges of one block, without overlaps."""
    placed: list[tuple[float, float, float, float]] = []  # axis-aligned x0, y0, x1, y1
    out = []
    for side in range(4):
        along = 0.0
        length = (x1 - x0) if side % 2 == 0 else (y1 - y0)
        while along < length - 6.0:
            frontage = min(rng.uniform(10.0, 26.0), length - along)
            depth = rng.uniform(10.0, 22.0)
            setback = rng.uniform(0.0, 3.0)
            rect = _edge_rect(side, along, frontage, depth, setback, x0, y0, x1, y1)
            along += frontage + rng.uniform(1.5, 8.0)
            if rng.random() < config.empty_lot_share or any(_overlaps(rect, p) for p in placed):
                continue
            placed.append(rect)
            height = rng.uniform(*config.building_height_m)
            rx0, ry0, rx1, ry1 = rect
            out.append([(rx0 + rx1) / 2, (ry0 + ry1) / 2, height / 2, rx1 - rx0, ry1 - ry0, height, 0.0])
    return out


def _edge_rect(side: int, along: float, frontage: float, depth: float, setback: float,
               x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
    """Rectangle on one edge of a block: 0 south, 1 east, 2 north, 3 west."""
    if side == 0:
        return (x0 + along, y0 + setback, x0 + along + frontage, y0 + setback + depth)
    if side == 1:
        return (x1 - setback - depth, y0 + along, x1 - setback, y0 + along + frontage)
    if side == 2:
        return (x1 - along - frontage, y1 - setback - depth, x1 - along, y1 - setback)
    return (x0 + setback, y1 - along - frontage, x0 + setback + depth, y1 - along)


def _overlaps(a: tuple[float, ...], b: tuple[float, ...], gap_m: float = 1.0) -> bool:
    return not (a[2] + gap_m <= b[0] or b[2] + gap_m <= a[0] or a[3] + gap_m <= b[1] or b[3] + gap_m <= a[1])


@dataclass(frozen=True, slots=True)
class Path:
    """A polyline sampled every ``step_m`` metres, with arc length."""

    xy: np.ndarray  # [P, 2]
    s_m: np.ndarray  # [P]
    closed: bool = False

    @property
    def length_m(self) -> float:
        return float(self.s_m[-1])

    def pose_at(self, s_m: float) -> tuple[np.ndarray, float]:
        """Position ``[2]`` and heading (rad) at arc length ``s_m``."""
        if self.closed:
            s_m = s_m % self.length_m
        s_m = float(np.clip(s_m, 0.0, self.length_m))
        k = int(np.clip(np.searchsorted(self.s_m, s_m, side="right") - 1, 0, len(self.s_m) - 2))
        seg = self.xy[k + 1] - self.xy[k]
        frac = (s_m - self.s_m[k]) / max(self.s_m[k + 1] - self.s_m[k], 1e-9)
        return self.xy[k] + frac * seg, float(np.arctan2(seg[1], seg[0]))


def make_path(points: np.ndarray, step_m: float = 0.5, closed: bool = False) -> Path:
    """Resample a polyline at even arc-length steps."""
    if closed:
        points = np.vstack([points, points[:1]])
    seg_len = np.linalg.norm(np.diff(points, axis=0), axis=1)
    keep = np.concatenate([[True], seg_len > 1e-6])
    points = points[keep]
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    s_new = np.arange(0.0, s[-1], step_m)
    s_new = np.append(s_new, s[-1])
    xy = np.stack([np.interp(s_new, s, points[:, 0]), np.interp(s_new, s, points[:, 1])], axis=1)
    return Path(xy=xy, s_m=s_new, closed=closed)


def _right(d: np.ndarray) -> np.ndarray:
    return np.array([d[1], -d[0]])


def lane_route(town: Town, nodes: list[int]) -> Path:
    """The right-hand lane along a sequence of adjacent intersections, with rounded turns."""
    pts: list[np.ndarray] = []
    dirs = []
    for a, b in zip(nodes[:-1], nodes[1:]):
        d = town.node_xy[b] - town.node_xy[a]
        dirs.append(d / np.linalg.norm(d))
    for k, (a, b) in enumerate(zip(nodes[:-1], nodes[1:])):
        d, r = dirs[k], _right(dirs[k])
        start = town.node_xy[a] + r * LANE_OFFSET_M + d * INTERSECTION_HALF_M
        end = town.node_xy[b] + r * LANE_OFFSET_M - d * INTERSECTION_HALF_M
        pts.extend([start, end])
        if k + 1 < len(dirs):
            d2 = dirs[k + 1]
            nxt = town.node_xy[b] + _right(d2) * LANE_OFFSET_M + d2 * INTERSECTION_HALF_M
            pts.extend(_bezier(end, d, nxt, d2))
    return make_path(np.asarray(pts))


def _bezier(p0: np.ndarray, d0: np.ndarray, p2: np.ndarray, d2: np.ndarray, n: int = 8) -> list[np.ndarray]:
    """Quadratic curve from ``p0`` (heading ``d0``) to ``p2`` (heading ``d2``)."""
    cross = d0[0] * d2[1] - d0[1] * d2[0]
    if abs(cross) < 1e-6:
        ctrl = (p0 + p2) / 2
    else:
        t = ((p2[0] - p0[0]) * d2[1] - (p2[1] - p0[1]) * d2[0]) / cross
        ctrl = p0 + t * d0
    ts = np.linspace(0.0, 1.0, n + 2)[1:-1]
    return [(1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t**2 * p2 for t in ts]


def random_walk(town: Town, start: int, nxt: int, length_m: float, rng: np.random.Generator) -> list[int]:
    """Intersections of a random drive over the grid (no U-turns) long enough for ``length_m``."""
    nodes = [start, nxt]
    while (len(nodes) - 1) * town.pitch_m < length_m + town.pitch_m:
        options = [n for n in town.neighbours(nodes[-1]) if n != nodes[-2]]
        nodes.append(int(rng.choice(options)))
    return nodes


def pavement_loop(town: Town, block_i: int, block_j: int, clockwise: bool) -> Path:
    """The pavement around one block, as a closed path."""
    lo, _ = town.extent_m
    x0 = lo + block_i * town.pitch_m + PAVEMENT_OFFSET_M
    y0 = lo + block_j * town.pitch_m + PAVEMENT_OFFSET_M
    x1, y1 = x0 + town.pitch_m - 2 * PAVEMENT_OFFSET_M, y0 + town.pitch_m - 2 * PAVEMENT_OFFSET_M
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    if clockwise:
        corners = corners[::-1]
    return make_path(corners, step_m=0.25, closed=True)
