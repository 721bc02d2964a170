"""Registry sweep over the BEV backbones: shapes match ``feature_info``, gradients flow, eval is deterministic."""

import pytest
import torch
from torch import nn

from models.backbones import (BACKBONES, BevNeck, MobileDetBackbone, build_backbone, build_bev_backbone,
                              list_backbones, parse_next_stage, register_backbone)

IN_CHANNELS = 8
NAMES = list_backbones()


def _input(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, IN_CHANNELS, 64, 64, generator=generator)  # [B, C, H, W]


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_backbone(name, in_channels=IN_CHANNELS)


def test_registry_has_both_families():
    assert {"mobiledet_tiny", "mobiledet_base", "nextvit_tiny", "nextvit_small"} <= set(NAMES)
    assert NAMES == sorted(BACKBONES)


@pytest.mark.parametrize("name", NAMES)
def test_levels_match_feature_info(name):
    model = _build(name).eval()
    x = _input()
    with torch.no_grad():
        features = model(x)
    assert isinstance(features, list)
    assert [f["reduction"] for f in model.feature_info] == [2, 4, 8]
    assert len(features) == len(model.feature_info)
    for feature, info in zip(features, model.feature_info):
        assert feature.shape == (2, info["num_chs"], 64 // info["reduction"], 64 // info["reduction"])
        assert torch.isfinite(feature).all()


@pytest.mark.parametrize("name", NAMES)
def test_backward_gives_finite_gradients(name):
    model = _build(name).train()
    features = model(_input())
    loss = sum(f.square().mean() for f in features)
    assert torch.isfinite(loss)
    loss.backward()
    for param_name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{param_name} got no gradient"
            assert torch.isfinite(param.grad).all(), f"{param_name} has a non-finite gradient"


@pytest.mark.parametrize("name", NAMES)
def test_eval_is_deterministic(name):
    model = _build(name).eval()
    x = _input()
    with torch.no_grad():
        first, second = model(x), model(x.clone())
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_bev_backbone_output_at_reduction_2(name):
    torch.manual_seed(0)
    model = build_bev_backbone(name, in_channels=IN_CHANNELS, out_channels=24).eval()
    assert (model.out_channels, model.reduction) == (24, 2)
    with torch.no_grad():
        out = model(_input())
    assert out.shape == (2, 24, 32, 32)
    assert torch.isfinite(out).all()


def test_neck_handles_non_square_grids():
    backbone = _build("mobiledet_tiny").eval()
    neck = BevNeck(backbone.feature_info, out_channels=16).eval()
    with torch.no_grad():
        out = neck(backbone(torch.randn(1, IN_CHANNELS, 32, 48)))
    assert out.shape == (1, 16, 16, 24)


def test_registry_refuses_duplicate_name():
    original = BACKBONES["mobiledet_tiny"]

    def mobiledet_tiny(*, in_channels: int) -> nn.Module:
        return nn.Identity()

    with pytest.raises(ValueError, match="already registered"):
        register_backbone(mobiledet_tiny)
    assert BACKBONES["mobiledet_tiny"] is original


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError) as excinfo:
        build_backbone("resnet_9000", in_channels=IN_CHANNELS)
    message = str(excinfo.value)
    assert "resnet_9000" in message
    assert all(name in message for name in NAMES)


def test_mobiledet_rejects_plan_without_one_level_per_stage():
    with pytest.raises(ValueError, match="one level per stage"):
        MobileDetBackbone([["er_r1_k3_s2_e1_c16"], ["ir_r1_k3_s2_e4_c32"]], in_channels=IN_CHANNELS, stem_channels=16)


def test_next_stage_plan_parsing():
    types, channels = parse_next_stage("C32 C32 T64")
    assert [t.__name__ for t in types] == ["NextConvBlock", "NextConvBlock", "NextTransformerBlock"]
    assert channels == [32, 32, 64]
    with pytest.raises(ValueError, match="X32"):
        parse_next_stage("C32 X32")
