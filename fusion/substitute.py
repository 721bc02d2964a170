"""Frame substitution: each agent's last good evidence, per cell, standing in for what did not arrive.

Per agent, :class:`EvidenceMemory` keeps a feature map in the frame of the newest frame it
has taken in, with each cell's capture time. Taking in a frame moves the memory by the
agent's ego-motion since the memory's frame (the relative pose of the two BEV frames: on the
world-aligned lattice this is a whole-cell shift, so nothing is resampled) and writes the
frame's arrived tiles over it; a frame that arrives late writes only cells for which the
memory holds nothing newer. The contribution for a fusion slot is then the memory with a
weight per cell: 1 for what arrived in this slot's frame, ``1 - age / max_age`` for older
evidence (substituted), 0 beyond ``max_age`` or where nothing was ever seen. The merge gives
a cell's agents weights in proportion (``models.warp.AttentionMerge``), so fresh evidence
from another agent outweighs an old substitute, and an old substitute alone is still used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.bev import BevGrid
from models.geometry import invert_se3
from models.warp import warp_to_ego

NEVER = -1e30
"""Capture time (ms) of a cell that holds no evidence."""


@dataclass(slots=True)
class SlotEvidence:
    """What an agent contributes to one fusion slot."""

    features: torch.Tensor  # [1, C, h, w] in the frame of world_from_agent
    weight: torch.Tensor  # [1, 1, h, w] in [0, 1]
    world_from_agent: np.ndarray
    fresh_tiles: int
    substituted_tiles: int
    dropped_tiles: int
    substituted_age_ms: float
    substituted_max_age_ms: float


class EvidenceMemory:
    """One agent's newest evidence per cell (see the module docstring)."""

    def __init__(self, grid: BevGrid, tile_cells: int, time_origin_ns: int) -> None:
        self.grid = grid
        self.tile_cells = tile_cells
        self.origin_ns = time_origin_ns
        self.features: torch.Tensor | None = None  # [1, C, h, w]
        self.capture_ms: torch.Tensor | None = None  # [1, 1, h, w], NEVER where empty
        self.world_from_memory: np.ndarray | None = None
        self.newest_capture_ns = 0
        self.cell_m = 0.0

    def _ms(self, time_ns: int) -> float:
        return (time_ns - self.origin_ns) / 1e6

    def _moved(self, memory_from_old: np.ndarray, tensor: torch.Tensor, fill: float) -> torch.Tensor:
        """``tensor`` (in the old frame) resampled into the memory's frame, ``fill`` outside."""
        if np.allclose(memory_from_old, np.eye(4), atol=1e-6):
            return tensor
        shift = self._whole_cell_shift(memory_from_old)
        if shift is not None:  # the usual case: a copy of a shifted window, no resampling
            dx, dy = shift  # the old frame's origin in the memory's frame, in cells
            out = torch.full_like(tensor, fill)
            h, w = tensor.shape[-2:]
            if abs(dx) < w and abs(dy) < h:
                out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
                    tensor[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
            return out
        pose = torch.as_tensor(memory_from_old, dtype=torch.float32, device=tensor.device)[None]
        moved, inside = warp_to_ego(tensor.float(), pose, self.grid, mode="nearest")
        return torch.where(inside > 0, moved, torch.full_like(moved, fill))

    def _whole_cell_shift(self, memory_from_old: np.ndarray) -> tuple[int, int] | None:
        """(columns, rows) when ``memory_from_old`` is a planar translation by whole cells, else ``None``."""
        if not np.allclose(memory_from_old[:3, :3], np.eye(3), atol=1e-6):
            return None
        cells = memory_from_old[:2, 3] / self.cell_m
        whole = np.round(cells)
        if not np.allclose(cells, whole, atol=1e-4):
            return None
        return int(whole[0]), int(whole[1])

    def take(self, features: torch.Tensor, arrived: torch.Tensor, world_from_agent: np.ndarray,
             capture_time_ns: int) -> None:
        """Take in one frame: ``features`` ``[1, C, h, w]``, ``arrived`` ``[1, 1, h, w]`` (1 where its tiles came)."""
        capture = self._ms(capture_time_ns)
        self.cell_m = (self.grid.x_max_m - self.grid.x_min_m) / features.shape[-1]
        if self.features is None:
            self.features = torch.zeros_like(features)
            self.capture_ms = torch.full_like(arrived, NEVER, dtype=torch.float32)
            self.world_from_memory = world_from_agent.copy()
        if capture_time_ns > self.newest_capture_ns:  # a newer frame: the memory moves into its frame
            new_from_memory = invert_se3(world_from_agent) @ self.world_from_memory
            self.features = self._moved(new_from_memory, self.features, 0.0)
            self.capture_ms = self._moved(new_from_memory, self.capture_ms, NEVER)
            self.world_from_memory = world_from_agent.copy()
            self.newest_capture_ns = capture_time_ns
            frame_features, frame_arrived = features, arrived
        else:  # a late frame: into the memory's frame, only where nothing newer is held
            memory_from_frame = invert_se3(self.world_from_memory) @ world_from_agent
            frame_features = self._moved(memory_from_frame, features, 0.0)
            frame_arrived = self._moved(memory_from_frame, arrived, 0.0)
        write = (frame_arrived > 0) & (self.capture_ms <= capture)
        self.features = torch.where(write, frame_features.to(self.features.dtype), self.features)
        self.capture_ms = torch.where(write, torch.full_like(self.capture_ms, capture), self.capture_ms)

    def evidence(self, slot_time_ns: int, max_age_ms: float, substitute: bool, fresh_capture_ns: int | None,
                 tile_count: int) -> SlotEvidence | None:
        """The contribution for the slot at ``slot_time_ns``; ``None`` when nothing usable is held.

        ``fresh_capture_ns`` is the capture time of this slot's own frame (``None`` when none
        arrived): its cells count as fresh. Without ``substitute`` only those are used.
        """
        if self.features is None:
            return None
        fresh = (self.capture_ms == self._ms(fresh_capture_ns)) if fresh_capture_ns is not None else (
            torch.zeros_like(self.capture_ms, dtype=torch.bool))
        age = (self._ms(slot_time_ns) - self.capture_ms).clamp_min(0.0)
        held = self.capture_ms > NEVER / 2
        if substitute and max_age_ms > 0:
            old = held & ~fresh & (age <= max_age_ms)
            weight = torch.where(fresh, 1.0, torch.where(old, (1.0 - age / max_age_ms).clamp_min(0.0), 0.0))
            old = old & (weight > 0)
        else:
            old = torch.zeros_like(fresh)
            weight = fresh.float()
        if not bool((weight > 0).any()):
            return None
        fresh_tiles, old_tiles = self._per_tile(fresh), self._per_tile(old)
        substituted = old_tiles & ~fresh_tiles
        ages = age[old]
        return SlotEvidence(self.features, weight.float(), self.world_from_memory, int(fresh_tiles.sum()),
                            int(substituted.sum()), max(0, tile_count - int(fresh_tiles.sum()) - int(substituted.sum())),
                            float(ages.mean()) if len(ages) else 0.0, float(ages.max()) if len(ages) else 0.0)

    def _per_tile(self, cells: torch.Tensor) -> torch.Tensor:
        """``[1, 1, h, w]`` bool -> ``[rows, cols]`` bool: any cell of the tile set."""
        t = self.tile_cells
        if t <= 0:
            return cells.any().reshape(1, 1)
        pooled = torch.nn.functional.max_pool2d(cells.float(), kernel_size=t, stride=t, ceil_mode=True)
        return pooled[0, 0] > 0
