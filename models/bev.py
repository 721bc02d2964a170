"""The bird's-eye-view grid: which cell holds which point of the agent's ground plane.

The grid lies in an agent's *BEV frame* (:func:`aligned_bev_frame`): on the
ground under the agent (z up from the ground, so vehicles and roadside units
with LiDARs 2 m or 5 m up share one height band), with its axes along the
shared world frame's and its origin snapped to a lattice of feature cells.
Every agent's grid is then a whole number of feature cells away from every
other's, with no rotation between them: moving features between agents is an
exact shift of cells, not a blurring resample, and a feature channel means
the same direction in every agent's map.

Tensors on the grid are ``[B, C, H, W]``: rows (H) run along +y, columns (W)
along +x, and cell ``(row, col)`` covers
``x in [x_min_m + col * cell_size_m, x_min_m + (col + 1) * cell_size_m)`` and
likewise for y. The same convention is written into ``cp.v1.BevGridSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class BevGridConfig(BaseModel):
    """Extent and resolution of a BEV grid around the agent (metres, agent/LiDAR frame)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    x_min_m: float = -50.0
    x_max_m: float = 50.0
    y_min_m: float = -50.0
    y_max_m: float = 50.0
    cell_size_m: float = Field(0.5, gt=0.0)
    """Edge of one square cell."""
    z_min_m: float = -1.0
    """Points below this height above the ground are ignored."""
    z_max_m: float = 4.0
    """Points above this height above the ground are ignored."""

    @model_validator(mode="after")
    def _whole_cells(self) -> BevGridConfig:
        for lo, hi, axis in ((self.x_min_m, self.x_max_m, "x"), (self.y_min_m, self.y_max_m, "y")):
            cells = (hi - lo) / self.cell_size_m
            if hi <= lo or abs(cells - round(cells)) > 1e-6:
                raise ValueError(f"{axis} range [{lo}, {hi}] must be positive and a whole number of "
                                 f"{self.cell_size_m} m cells")
        return self

    def build(self) -> BevGrid:
        return BevGrid(self.x_min_m, self.x_max_m, self.y_min_m, self.y_max_m, self.cell_size_m,
                       self.z_min_m, self.z_max_m)


@dataclass(frozen=True, slots=True)
class BevGrid:
    """A validated grid (build it from :class:`BevGridConfig`)."""

    x_min_m: float
    x_max_m: float
    y_min_m: float
    y_max_m: float
    cell_size_m: float
    z_min_m: float = -1.0
    z_max_m: float = 4.0

    @property
    def width_cells(self) -> int:
        return int(round((self.x_max_m - self.x_min_m) / self.cell_size_m))

    @property
    def height_cells(self) -> int:
        return int(round((self.y_max_m - self.y_min_m) / self.cell_size_m))

    def cell_of(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row, column (int) and an inside-the-grid mask for points ``[N, >=2]``."""
        col = np.floor((xy[:, 0] - self.x_min_m) / self.cell_size_m).astype(np.int64)
        row = np.floor((xy[:, 1] - self.y_min_m) / self.cell_size_m).astype(np.int64)
        inside = (col >= 0) & (col < self.width_cells) & (row >= 0) & (row < self.height_cells)
        return row, col, inside

    def cell_centre(self, row: np.ndarray, col: np.ndarray) -> np.ndarray:
        """``[N, 2]`` x, y of cell centres."""
        return np.stack([self.x_min_m + (col + 0.5) * self.cell_size_m,
                         self.y_min_m + (row + 0.5) * self.cell_size_m], axis=-1)

    def contains(self, xy: np.ndarray) -> np.ndarray:
        """Mask of points ``[N, >=2]`` inside the grid's extent."""
        return ((xy[:, 0] >= self.x_min_m) & (xy[:, 0] < self.x_max_m)
                & (xy[:, 1] >= self.y_min_m) & (xy[:, 1] < self.y_max_m))


def aligned_bev_frame(world_from_ground: np.ndarray, lattice_m: float) -> tuple[np.ndarray, np.ndarray]:
    """An agent's BEV frame: world-aligned axes, origin on the ``lattice_m`` lattice nearest the agent.

    Args:
        world_from_ground: ``[4, 4]`` the agent's ground frame (its sensor frame on the ground) in the
            world, as the agent knows it (reported, not true, pose).
        lattice_m: the lattice pitch, the size of one feature cell (0 keeps the exact position).

    Returns:
        ``world_from_bev`` (a pure translation on the ground plane) and ``bev_from_ground``
        (the agent's turn, and a shift of at most half a lattice step per axis), which moves the
        agent's points into its BEV frame.
    """
    if lattice_m < 0:
        raise ValueError(f"lattice pitch must be >= 0 m, got {lattice_m}")
    position = world_from_ground[:2, 3]
    world_from_bev = np.eye(4)
    world_from_bev[:2, 3] = np.round(position / lattice_m) * lattice_m if lattice_m > 0 else position
    world_from_bev[2, 3] = world_from_ground[2, 3]
    bev_from_world = np.eye(4)
    bev_from_world[:3, 3] = -world_from_bev[:3, 3]
    return world_from_bev, bev_from_world @ world_from_ground
