"""The bird's-eye-view grid: which cell holds which point of the agent's ground plane.

The grid lies in an agent's *ground frame*: its LiDAR frame moved down to the
ground (x forward, y left, z up from the ground), so vehicles and roadside
units (LiDAR 2 m or 5 m up) share one height band.

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
    def _whole_cells(self) -> "BevGridConfig":
        for lo, hi, axis in ((self.x_min_m, self.x_max_m, "x"), (self.y_min_m, self.y_max_m, "y")):
            cells = (hi - lo) / self.cell_size_m
            if hi <= lo or abs(cells - round(cells)) > 1e-6:
                raise ValueError(f"{axis} range [{lo}, {hi}] must be positive and a whole number of "
                                 f"{self.cell_size_m} m cells")
        return self

    def build(self) -> "BevGrid":
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
