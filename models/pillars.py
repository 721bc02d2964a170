"""LiDAR points to a BEV pseudo-image: one learned feature vector per grid cell (pillar)."""

from __future__ import annotations

import torch
from torch import nn

from models.bev import BevGrid

POINT_FEATURES = 7
"""x, y, z, intensity, and the offset (x, y, z) of the point from its pillar's centre."""


class PillarEncoder(nn.Module):
    """PointPillars-style encoder: a shared per-point layer, then a max over each cell.

    Args:
        grid: the BEV grid the pseudo-image covers (agent/LiDAR frame).
        out_channels: channels of the pseudo-image.

    Input is a list of ``[N_i, 4]`` point tensors (x, y, z, intensity) in the
    LiDAR frame, one per sample; points outside the grid or its height band
    are ignored, and an empty cloud gives an all-zero image.
    Output is ``[B, out_channels, H, W]``.
    """

    def __init__(self, grid: BevGrid, *, out_channels: int = 32) -> None:
        super().__init__()
        self.grid = grid
        self.out_channels = out_channels
        self.point_net = nn.Sequential(nn.Linear(POINT_FEATURES, out_channels, bias=False),
                                       nn.BatchNorm1d(out_channels), nn.ReLU(inplace=True))

    def forward(self, points: list[torch.Tensor]) -> torch.Tensor:
        g = self.grid
        height, width = g.height_cells, g.width_cells
        device = self.point_net[0].weight.device
        feats, cells = [], []
        for b, cloud in enumerate(points):
            f, cell = self._point_features(cloud.to(device=device, dtype=torch.float32))
            feats.append(f)
            cells.append(cell + b * height * width)
        point_feats = torch.cat(feats)  # [P, 7]
        cell_index = torch.cat(cells)  # [P]
        canvas = point_feats.new_zeros(len(points) * height * width, self.out_channels)
        if len(point_feats):
            if self.training:
                encoded = self.point_net(point_feats) if len(point_feats) > 1 else self._single(point_feats)
            else:
                encoded = self._folded(point_feats)
            canvas = canvas.scatter_reduce(0, cell_index[:, None].expand_as(encoded), encoded, reduce="amax",
                                           include_self=True)
        # [B*H*W, C] -> [B, C, H, W]
        return canvas.view(len(points), height, width, self.out_channels).permute(0, 3, 1, 2).contiguous()

    def _folded(self, point_feats: torch.Tensor) -> torch.Tensor:
        """Inference: the linear layer and the batch norm's running statistics as one affine map
        (the same numbers, in one matrix product instead of three passes over every point)."""
        linear, norm, _ = self.point_net
        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)  # [C]
        weight = linear.weight * scale[:, None]  # [C, 7]
        bias = norm.bias - norm.running_mean * scale
        return torch.relu(torch.addmm(bias, point_feats, weight.t()))

    def _single(self, point_feats: torch.Tensor) -> torch.Tensor:
        # BatchNorm cannot take statistics of one point in training; use the running ones.
        linear, norm, act = self.point_net
        return act(nn.functional.batch_norm(linear(point_feats), norm.running_mean, norm.running_var,
                                            norm.weight, norm.bias, False, 0.0, norm.eps))

    def _point_features(self, cloud: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.grid
        x, y, z = cloud[:, 0], cloud[:, 1], cloud[:, 2]
        keep = ((x >= g.x_min_m) & (x < g.x_max_m) & (y >= g.y_min_m) & (y < g.y_max_m)
                & (z >= g.z_min_m) & (z < g.z_max_m))
        cloud = cloud[keep]
        col = ((cloud[:, 0] - g.x_min_m) / g.cell_size_m).floor().clamp(0, g.width_cells - 1)
        row = ((cloud[:, 1] - g.y_min_m) / g.cell_size_m).floor().clamp(0, g.height_cells - 1)
        centre_x = g.x_min_m + (col + 0.5) * g.cell_size_m
        centre_y = g.y_min_m + (row + 0.5) * g.cell_size_m
        offsets = torch.stack([(cloud[:, 0] - centre_x) / g.cell_size_m, (cloud[:, 1] - centre_y) / g.cell_size_m,
                               cloud[:, 2] - (g.z_min_m + g.z_max_m) / 2], dim=1)
        feats = torch.cat([cloud[:, :4], offsets], dim=1)  # [P, 7]
        return feats, (row * g.width_cells + col).long()
