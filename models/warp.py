"""Moving BEV features between agents' grids, and merging them.

The warp is a pure function of the relative pose and the grid spec: a cell of
the ego's grid takes the (bilinearly sampled) feature found at the same world
point in the agent's grid. Only the planar part of the pose (x, y, yaw) is
used: BEV features have no height axis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.bev import BevGrid


def bev_affine(agent_from_ego: torch.Tensor, grid: BevGrid) -> torch.Tensor:
    """``[N, 2, 3]`` affine map from ego-grid to agent-grid normalised coordinates.

    ``agent_from_ego`` is ``[N, 4, 4]`` (or ``[N, 3, 3]`` SE(2)). Normalised
    coordinates are those of ``F.affine_grid`` with ``align_corners=False``:
    -1 and +1 are the outer edges of the first and last cells.
    """
    rotation = agent_from_ego[:, :2, :2]  # [N, 2, 2]
    translation = agent_from_ego[:, :2, -1]  # [N, 2]
    scale = agent_from_ego.new_tensor([(grid.x_max_m - grid.x_min_m) / 2, (grid.y_max_m - grid.y_min_m) / 2])
    centre = agent_from_ego.new_tensor([(grid.x_max_m + grid.x_min_m) / 2, (grid.y_max_m + grid.y_min_m) / 2])
    # metres = scale * u + centre; u_agent = S^-1 (R (S u_ego + c) + t - c)
    theta_linear = rotation * scale[None, None, :] / scale[None, :, None]
    theta_shift = ((rotation @ centre) + translation - centre) / scale
    return torch.cat([theta_linear, theta_shift[:, :, None]], dim=2)


def warp_to_ego(features: torch.Tensor, ego_from_agent: torch.Tensor, grid: BevGrid,
                mode: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """Resample each agent's features ``[N, C, H, W]`` into the ego's grid.

    Args:
        features: per-agent BEV features on ``grid`` (any resolution covering it).
        ego_from_agent: ``[N, 4, 4]`` pose of each agent's grid frame in the ego's.
        grid: the grid both feature maps cover (in their own frames).
        mode: ``bilinear`` or ``nearest``.

    Returns:
        warped ``[N, C, H, W]`` and a coverage mask ``[N, 1, H, W]`` (1 where
        the ego cell lies inside the agent's grid).
    """
    agent_from_ego = torch.linalg.inv(ego_from_agent.to(features.dtype))
    theta = bev_affine(agent_from_ego, grid)
    sample_at = F.affine_grid(theta, list(features.shape), align_corners=False)
    warped = F.grid_sample(features, sample_at, mode=mode, padding_mode="zeros", align_corners=False)
    inside = (sample_at.abs() <= 1.0).all(dim=-1, keepdim=True).permute(0, 3, 1, 2).to(features.dtype)
    return warped, inside


def max_merge(features: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Element-wise max over agents ``[N, C, H, W]`` -> ``[1, C, H, W]`` (uncovered cells ignored)."""
    masked = features.masked_fill(coverage <= 0, float("-inf"))
    merged = masked.max(dim=0, keepdim=True).values
    return torch.nan_to_num(merged, neginf=0.0)


class AttentionMerge(nn.Module):
    """Per-cell softmax over agents of a learned confidence (a 1x1 conv of each agent's features).

    Agents that do not cover a cell get no weight there; a cell nobody covers
    is zero. With one agent it returns that agent's features unchanged. A coverage between
    0 and 1 (evidence weighted down, e.g. by age) scales that agent's share before the
    softmax normalises: ``w_i = c_i exp(s_i) / sum_j c_j exp(s_j)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.score = nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, features: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
        prior = torch.log(coverage.clamp_min(1e-6))  # 0 where coverage is 1: the binary case is unchanged
        logits = (self.score(features) + prior).masked_fill(coverage <= 0, float("-inf"))  # [N, 1, H, W]
        weights = torch.nan_to_num(torch.softmax(logits, dim=0), nan=0.0)
        return (weights * features).sum(dim=0, keepdim=True)


class ContextMerge(nn.Module):
    """Attention over agents that looks around each cell, then a learned correction of the merge.

    Each agent's score in a cell comes from a 3x3 neighbourhood of its own warped features *next to*
    the element-wise max over all agents and its coverage, so an agent can be preferred where it
    sees something the others do not (a 1x1 score of its features alone cannot tell). The weighted
    sum is then corrected by a residual conv block over ``[weighted sum, max]``, applied only where
    two or more agents cover a cell: with one agent the merge returns its features unchanged.
    Coverage between 0 and 1 (evidence weighted down by age) scales an agent's share as in
    :class:`AttentionMerge`.
    """

    def __init__(self, channels: int, hidden: int = 32) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Conv2d(2 * channels + 1, hidden, kernel_size=3, padding=1), nn.ReLU(),
                                   nn.Conv2d(hidden, 1, kernel_size=1))
        self.correct = nn.Sequential(nn.Conv2d(2 * channels, channels, kernel_size=3, padding=1, bias=False),
                                     nn.BatchNorm2d(channels), nn.ReLU(),
                                     nn.Conv2d(channels, channels, kernel_size=1))
        nn.init.zeros_(self.correct[-1].weight)  # starts as the attention-weighted sum
        nn.init.zeros_(self.correct[-1].bias)

    def forward(self, features: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
        agents = features.shape[0]
        strongest = max_merge(features, coverage)  # [1, C, H, W]
        context = torch.cat([features, strongest.expand(agents, -1, -1, -1), coverage], dim=1)
        prior = torch.log(coverage.clamp_min(1e-6))
        logits = (self.score(context) + prior).masked_fill(coverage <= 0, float("-inf"))
        weights = torch.nan_to_num(torch.softmax(logits, dim=0), nan=0.0)
        merged = (weights * features).sum(dim=0, keepdim=True)
        shared = ((coverage > 0).sum(dim=0, keepdim=True) >= 2).to(features.dtype)  # [1, 1, H, W]
        return merged + shared * self.correct(torch.cat([merged, strongest], dim=1))
