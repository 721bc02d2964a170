"""Tests for models.warp: exact warps of a one-hot cell on small grids, coverage, and merging."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.bev import BevGrid, BevGridConfig, aligned_bev_frame
from models.geometry import se3_from_xyz_rpy
from models.warp import AttentionMerge, bev_affine, max_merge, warp_to_ego

SQUARE = BevGrid(x_min_m=-4.0, x_max_m=4.0, y_min_m=-4.0, y_max_m=4.0, cell_size_m=1.0)  # 8 x 8
WIDE = BevGrid(x_min_m=-4.0, x_max_m=4.0, y_min_m=-2.0, y_max_m=2.0, cell_size_m=1.0)  # 4 rows x 8 columns




def _pose(x_m: float = 0.0, y_m: float = 0.0, quarter_turns: int = 0) -> torch.Tensor:
    """``ego_from_agent`` [1, 4, 4] with an exact rotation by ``quarter_turns`` * 90 degrees."""
    c, s = [(1, 0), (0, 1), (-1, 0), (0, -1)][quarter_turns % 4]
    return torch.tensor([[[c, -s, 0.0, x_m], [s, c, 0.0, y_m], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]])


def _one_hot(grid: BevGrid, row: int, col: int, channels: int = 1) -> torch.Tensor:
    """``[1, channels, H, W]`` zeros with 1.0 at (row, col) in every channel."""
    features = torch.zeros(1, channels, grid.height_cells, grid.width_cells)
    features[0, :, row, col] = 1.0
    return features


def _cell_at(grid: BevGrid, x_m: float, y_m: float) -> tuple[int, int]:
    row, col, inside = grid.cell_of(np.array([[x_m, y_m]]))
    assert inside[0], (x_m, y_m)
    return int(row[0]), int(col[0])


def _assert_moved(grid: BevGrid, ego_from_agent: torch.Tensor, agent_xy: tuple[float, float],
                  ego_xy: tuple[float, float], mode: str = "bilinear") -> None:
    """The one-hot at the agent cell containing ``agent_xy`` lands exactly on the ego cell of ``ego_xy``."""
    features = _one_hot(grid, *_cell_at(grid, *agent_xy), channels=2)
    warped, coverage = warp_to_ego(features, ego_from_agent, grid, mode=mode)
    expected = _one_hot(grid, *_cell_at(grid, *ego_xy), channels=2)
    assert torch.equal(warped, expected), torch.nonzero(warped).tolist()
    assert float(warped.sum()) == 2.0
    assert coverage.shape == (1, 1, grid.height_cells, grid.width_cells)


def test_bev_affine_of_identity_is_identity() -> None:
    for grid in (SQUARE, WIDE):
        theta = bev_affine(torch.eye(4)[None], grid)
        assert torch.equal(theta, torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]))


def test_bev_affine_of_quarter_turn_on_wide_grid_rescales_axes() -> None:
    # agent_from_ego: +90 deg. Ego u (x over 4 m) maps to agent y (over 2 m): factor 4/2 = 2 in row 1.
    theta = bev_affine(_pose(quarter_turns=1), WIDE)
    assert torch.equal(theta, torch.tensor([[[0.0, -0.5, 0.0], [2.0, 0.0, 0.0]]]))


@pytest.mark.parametrize("grid", [SQUARE, WIDE], ids=["square", "wide"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_identity_pose_leaves_features_unchanged(grid: BevGrid, mode: str) -> None:
    features = torch.randn(2, 3, grid.height_cells, grid.width_cells, generator=torch.Generator().manual_seed(0))
    warped, coverage = warp_to_ego(features, torch.eye(4).expand(2, 4, 4), grid, mode=mode)
    assert torch.equal(warped, features)
    assert torch.equal(coverage, torch.ones(2, 1, grid.height_cells, grid.width_cells))


def test_quarter_turn_moves_cell_exactly() -> None:
    # Agent turned +90 deg at the ego's origin: agent (x, y) is ego (-y, x).
    # Agent cell centre (1.5, -2.5) = row 1, col 5  ->  ego (2.5, 1.5) = row 5, col 6.
    _assert_moved(SQUARE, _pose(quarter_turns=1), (1.5, -2.5), (2.5, 1.5))
    assert _cell_at(SQUARE, 1.5, -2.5) == (1, 5) and _cell_at(SQUARE, 2.5, 1.5) == (5, 6)


def test_quarter_turn_from_se3_builder_matches_within_rounding() -> None:
    # The same turn built from float yaw (cos(pi/2) is 6e-17, not 0): the cell still lands, up to rounding.
    pose = torch.as_tensor(se3_from_xyz_rpy(0.0, 0.0, 0.0, 0.0, 0.0, math.pi / 2), dtype=torch.float32)[None]
    warped, _ = warp_to_ego(_one_hot(SQUARE, 1, 5), pose, SQUARE)
    torch.testing.assert_close(warped, _one_hot(SQUARE, 5, 6), atol=1e-5, rtol=0)


def test_half_turn_moves_cell_exactly() -> None:
    _assert_moved(SQUARE, _pose(quarter_turns=2), (1.5, -2.5), (-1.5, 2.5))


def test_translation_by_whole_cells_moves_cell_exactly() -> None:
    # Agent origin at ego (2, 1): agent (x, y) is ego (x + 2, y + 1).
    _assert_moved(SQUARE, _pose(2.0, 1.0), (-1.5, -2.5), (0.5, -1.5))
    _assert_moved(SQUARE, _pose(-3.0, 2.0), (2.5, -3.5), (-0.5, -1.5))


def test_rotation_then_translation_composed() -> None:
    # ego_from_agent = T(-2, 1) R(+90): agent (-1.5, -2.5) -> R -> (2.5, -1.5) -> T -> (0.5, -0.5).
    _assert_moved(SQUARE, _pose(-2.0, 1.0, quarter_turns=1), (-1.5, -2.5), (0.5, -0.5))
    # T(3, -1) R(-90): agent (-1.5, -2.5) -> R -> (-2.5, 1.5) -> T -> (0.5, 0.5); applying the
    # translation first (R T) would land on (-1.5, -4.5), outside the grid.
    _assert_moved(SQUARE, _pose(3.0, -1.0, quarter_turns=3), (-1.5, -2.5), (0.5, 0.5))


def test_wide_grid_translation_and_turn() -> None:
    _assert_moved(WIDE, _pose(3.0, -1.0), (-2.5, 1.5), (0.5, 0.5))
    _assert_moved(WIDE, _pose(-1.0, 1.0), (2.5, -1.5), (1.5, -0.5))
    # +90 deg on the non-square grid: agent (0.5, 1.5) is ego (-1.5, 0.5).
    _assert_moved(WIDE, _pose(quarter_turns=1), (0.5, 1.5), (-1.5, 0.5))
    _assert_moved(WIDE, _pose(quarter_turns=1), (0.5, 1.5), (-1.5, 0.5), mode="nearest")


def test_coverage_is_zero_where_ego_cell_falls_outside_agent_grid() -> None:
    # Agent 5 cells ahead: it covers ego x in [1, 9), i.e. ego columns 5..7 of 0..7.
    features = torch.ones(1, 2, SQUARE.height_cells, SQUARE.width_cells)
    warped, coverage = warp_to_ego(features, _pose(5.0, 0.0), SQUARE)
    expected_coverage = torch.zeros(1, 1, 8, 8)
    expected_coverage[..., 5:] = 1.0
    assert torch.equal(coverage, expected_coverage)
    assert torch.equal(warped[..., 5:], torch.ones(1, 2, 8, 3))
    # Far columns sample beyond the agent's edge (zero padding); column 4 straddles its edge.
    assert torch.equal(warped[..., :4], torch.zeros(1, 2, 8, 4))


def test_coverage_after_turn_and_offset_on_wide_grid() -> None:
    # Agent 2 m to the left (+y), same heading: it covers ego y in [0, 4) -> ego rows 2..3 of 0..3.
    warped, coverage = warp_to_ego(torch.ones(1, 1, 4, 8), _pose(0.0, 2.0), WIDE)
    assert coverage[0, 0].sum(dim=1).tolist() == [0.0, 0.0, 8.0, 8.0]
    assert torch.equal(warped[0, 0, 2:], torch.ones(2, 8))
    assert torch.equal(warped[0, 0, 0], torch.zeros(8))


def test_max_merge_takes_elementwise_max_of_covered_agents() -> None:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(3, 4, 8, 8, generator=generator)
    coverage = torch.ones(3, 1, 8, 8)
    merged = max_merge(features, coverage)
    assert merged.shape == (1, 4, 8, 8)
    assert torch.equal(merged[0], features.max(dim=0).values)


def test_max_merge_ignores_uncovered_agent_and_zeros_cells_nobody_covers() -> None:
    features = torch.full((2, 2, 4, 4), -1.0)  # agent 0: -1 everywhere
    features[1] = 100.0  # agent 1: huge, but only where it covers
    coverage = torch.ones(2, 1, 4, 4)
    coverage[1, :, :, :2] = 0.0  # agent 1 misses the left half
    coverage[0, :, 0, :] = 0.0  # agent 0 misses row 0
    merged = max_merge(features, coverage)[0]  # [2, 4, 4]
    assert torch.equal(merged[:, 1:, :2], torch.full((2, 3, 2), -1.0))  # the ego's own value, though negative
    assert torch.equal(merged[:, :, 2:], torch.full((2, 4, 2), 100.0))
    assert torch.equal(merged[:, 0, :2], torch.zeros(2, 2))  # nobody covers these


def test_attention_merge_one_agent_returns_its_features() -> None:
    torch.manual_seed(0)
    merge = AttentionMerge(4)
    features = torch.randn(1, 4, 6, 6)
    merged = merge(features, torch.ones(1, 1, 6, 6))
    assert torch.equal(merged, features)


def test_attention_merge_two_equal_agents_and_uncovered_cells() -> None:
    torch.manual_seed(0)
    merge = AttentionMerge(4)
    features = torch.randn(1, 4, 6, 6).expand(2, 4, 6, 6).contiguous()
    coverage = torch.ones(2, 1, 6, 6)
    coverage[:, :, :, 0] = 0.0  # column 0: nobody
    coverage[1, :, :, 1] = 0.0  # column 1: only agent 0
    merged = merge(features, coverage)
    assert merged.shape == (1, 4, 6, 6)
    torch.testing.assert_close(merged[..., 1:], features[:1, ..., 1:], atol=1e-6, rtol=1e-6)
    assert torch.equal(merged[..., 0], torch.zeros(1, 4, 6))


def test_attention_merge_uncovered_agent_gets_no_weight_and_gradients_stay_finite() -> None:
    torch.manual_seed(0)
    merge = AttentionMerge(3)
    features = torch.randn(2, 3, 5, 5)
    features[1] = 50.0
    features.requires_grad_(True)
    coverage = torch.ones(2, 1, 5, 5)
    coverage[1, :, :, :3] = 0.0  # agent 1 only covers columns 3..4
    coverage[0, :, 0, :] = 0.0  # agent 0 misses row 0; row 0, columns 0..2 nobody covers
    merged = merge(features, coverage)
    torch.testing.assert_close(merged[0, :, 1:, :3], features[0, :, 1:, :3].detach(), atol=1e-6, rtol=0)
    assert torch.equal(merged[0, :, 0, :3].detach(), torch.zeros(3, 3))
    merged.sum().backward()
    assert torch.isfinite(features.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in merge.parameters())


@pytest.mark.parametrize("x, y, yaw_deg", [(0.3, -0.2, 0.0), (13.1, -7.9, 37.0), (-101.0, 55.5, -160.0)])
def test_aligned_bev_frames_sit_on_the_lattice_and_keep_the_points_in_the_world(x, y, yaw_deg) -> None:
    world_from_ground = se3_from_xyz_rpy(x, y, 0.0, 0.0, 0.0, math.radians(yaw_deg))
    world_from_bev, bev_from_ground = aligned_bev_frame(world_from_ground, 2.0)
    np.testing.assert_allclose(world_from_bev[:3, :3], np.eye(3), atol=1e-12)  # world-aligned axes
    steps = world_from_bev[:2, 3] / 2.0
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-9)
    np.testing.assert_allclose(world_from_bev @ bev_from_ground, world_from_ground, atol=1e-9)
    assert np.all(np.abs(bev_from_ground[:2, 3]) <= 1.0 + 1e-9)  # at most half a step from the agent


def test_warp_between_aligned_frames_moves_features_by_whole_cells_exactly() -> None:
    """Agents on the lattice: the warp is an exact shift, no blur (a cell keeps its value)."""
    grid = BevGridConfig(x_min_m=-8, x_max_m=8, y_min_m=-8, y_max_m=8, cell_size_m=2.0).build()
    features = torch.zeros(1, 1, 8, 8)
    features[0, 0, 2, 5] = 1.0  # row 2 (y in [-4, -2)), col 5 (x in [2, 4))
    world_from_agent, _ = aligned_bev_frame(se3_from_xyz_rpy(4.3, -1.9, 0, 0, 0, 1.2), 2.0)
    ego_from_agent = torch.as_tensor(world_from_agent, dtype=torch.float32)[None]  # the ego's BEV frame: world origin
    warped, _ = warp_to_ego(features, ego_from_agent, grid)
    expected = torch.zeros(1, 1, 8, 8)
    expected[0, 0, 2 - 1, 5 + 2] = 1.0  # agent origin at (4, -2) m: two cells right, one down
    torch.testing.assert_close(warped, expected, atol=1e-5, rtol=0)
