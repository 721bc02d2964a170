"""BEV backbones: a registry of multi-scale CNN / hybrid encoders for LiDAR pseudo-images.

Every backbone takes a BEV pseudo-image ``[B, in_channels, H, W]`` and returns a list of
feature maps, finest first, at reductions 2, 4 and 8. Each declares ``feature_info`` (timm
style): one ``{"num_chs", "reduction", "module"}`` dict per returned level, in the same order,
so heads and necks read channel counts from the built module instead of from config.

Two families, both assembled from timm's building blocks:

* MobileDet-style CNNs (``mobiledet_*``): fused convolutions (``er``, EdgeResidual /
  FusedMBConv) on the high-resolution levels, where a full 3x3 convolution keeps an
  accelerator busier than a depthwise one, and inverted bottlenecks (``ir``) at the coarse level.
* Next-ViT-style hybrids (``nextvit_*``): Next convolution blocks (NCB) everywhere and Next
  transformer blocks (NTB) only at the coarsest level, where the token count is smallest.

H and W should be multiples of 8 so that every level is an exact down-sampling of the input.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct, SeparableConvNormAct, calculate_drop_path_rates
from timm.models._efficientnet_builder import EfficientNetBuilder, decode_arch_def, efficientnet_init_weights
from timm.models.nextvit import NextConvBlock, NextStage, NextTransformerBlock
from torch import nn

__all__ = ["BACKBONES", "BevBackbone", "BevNeck", "MobileDetBackbone", "NextViTBackbone", "build_backbone",
           "build_bev_backbone", "list_backbones", "mobiledet_base", "mobiledet_tiny", "nextvit_small",
           "nextvit_tiny", "parse_next_stage", "register_backbone"]

FeatureInfo = list[dict[str, Any]]
"""One dict per output level: ``num_chs``, ``reduction`` (stride w.r.t. the input), ``module``."""

BACKBONES: dict[str, Callable[..., nn.Module]] = {}
"""Registered backbone builders by name; each takes keyword-only ``in_channels`` (and overrides)."""

_F = TypeVar("_F", bound=Callable[..., nn.Module])


def register_backbone(fn: _F) -> _F:
    """Register a backbone builder under its function name.

    Raises:
        ValueError: if a builder of that name is already registered.
    """
    name = fn.__name__
    if name in BACKBONES:
        raise ValueError(f"backbone {name!r} is already registered")
    BACKBONES[name] = fn
    return fn


def list_backbones() -> list[str]:
    """Names of the registered backbones, sorted."""
    return sorted(BACKBONES)


def build_backbone(name: str, *, in_channels: int, **kwargs: Any) -> nn.Module:
    """Build a registered backbone.

    Args:
        name: a name from :func:`list_backbones`.
        in_channels: channels of the BEV pseudo-image.
        **kwargs: variant overrides passed to the builder (e.g. ``drop_path_rate``).

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    try:
        builder = BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}") from None
    return builder(in_channels=in_channels, **kwargs)


# --------------------------------------------------------------------------------------------
# MobileDet-style CNN
# --------------------------------------------------------------------------------------------

class MobileDetBackbone(nn.Module):
    """A conv stem at stride 2, then one stage of timm EfficientNet blocks per output level.

    Args:
        arch_def: one list of timm block strings per level (``'er_r1_k3_s2_e4_c32'``: fused
            EdgeResidual, 1 repeat, 3x3, stride 2, expansion 4, 32 out channels). The first
            stage must have stride 1 (it is the reduction-2 level, right after the stem) and
            every later stage must start with a stride-2 block.
        in_channels: channels of the input pseudo-image.
        stem_channels: output channels of the stride-2 stem convolution.
        act_layer: activation for the stem and all blocks (ReLU is the fastest on CPU).
        drop_path_rate: stochastic depth, increasing linearly over the blocks.

    Input ``[B, in_channels, H, W]``; output one ``[B, C_i, H / r_i, W / r_i]`` per level with
    ``C_i, r_i`` from ``feature_info``.
    """

    def __init__(
            self,
            arch_def: Sequence[Sequence[str]],
            *,
            in_channels: int,
            stem_channels: int,
            act_layer: type[nn.Module] = nn.ReLU,
            drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.stem = ConvNormAct(in_channels, stem_channels, kernel_size=3, stride=2, act_layer=act_layer)
        # The builder tracks strides as if after a stride-2 stem, which is what we have.
        builder = EfficientNetBuilder(output_stride=32, pad_type="", act_layer=act_layer,
                                      norm_layer=nn.BatchNorm2d, drop_path_rate=drop_path_rate)
        self.stages = nn.ModuleList(builder(stem_channels, decode_arch_def([list(s) for s in arch_def])))
        if len(builder.features) != len(self.stages):
            # The builder marks a level only where the next stage starts with stride 2 (and adds
            # the stem as a level if the first block strides); we want exactly one per stage.
            raise ValueError(f"arch_def must give one level per stage (first stage stride 1, every later "
                             f"stage starting with stride 2); got levels {builder.features}")
        self.feature_info: FeatureInfo = [
            dict(num_chs=f["num_chs"], reduction=f["reduction"], module=f"stages.{i}")
            for i, f in enumerate(builder.features)]
        efficientnet_init_weights(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)  # [B, stem_channels, H/2, W/2]
        features = []
        for stage in self.stages:
            x = stage(x)  # [B, C_i, H/r_i, W/r_i]
            features.append(x)
        return features


def _create_mobiledet(arch_def: Sequence[Sequence[str]], *, in_channels: int, stem_channels: int,
                      **kwargs: Any) -> MobileDetBackbone:
    return MobileDetBackbone(arch_def, in_channels=in_channels, stem_channels=stem_channels, **kwargs)


@register_backbone
def mobiledet_tiny(*, in_channels: int, **kwargs: Any) -> MobileDetBackbone:
    """MobileDet-style CNN for CPU: 16/32/64 channels at reductions 2/4/8."""
    arch_def = (
        ("er_r1_k3_s1_e1_c16",),                       # r2: a fused 3x3 on the stem output
        ("er_r1_k3_s2_e4_c32", "er_r1_k3_s1_e2_c32"),  # r4: fused bottlenecks
        ("ir_r1_k3_s2_e4_c64", "ir_r2_k3_s1_e4_c64"),  # r8: inverted bottlenecks
    )
    return _create_mobiledet(arch_def, in_channels=in_channels, stem_channels=16, **kwargs)


@register_backbone
def mobiledet_base(*, in_channels: int, **kwargs: Any) -> MobileDetBackbone:
    """MobileDet-style CNN for GPU: 24/48/96 channels at reductions 2/4/8."""
    arch_def = (
        ("er_r1_k3_s1_e2_c24",),
        ("er_r1_k3_s2_e4_c48", "er_r2_k3_s1_e4_c48"),
        ("er_r1_k3_s2_e4_c96", "ir_r3_k3_s1_e4_c96"),
    )
    return _create_mobiledet(arch_def, in_channels=in_channels, stem_channels=24, **kwargs)


# --------------------------------------------------------------------------------------------
# Next-ViT-style hybrid
# --------------------------------------------------------------------------------------------

_NEXT_BLOCK_TYPES: dict[str, type[nn.Module]] = {"C": NextConvBlock, "T": NextTransformerBlock}
_NEXT_BLOCK_RE = re.compile(r"([CT])(\d+)")


def parse_next_stage(plan: str) -> tuple[list[type[nn.Module]], list[int]]:
    """Parse a stage plan such as ``"C32 C32 T64"`` (block type C=NCB / T=NTB, output channels).

    Returns:
        The block classes and their output channels, in order.

    Raises:
        ValueError: on a malformed token.
    """
    types, channels = [], []
    for token in plan.split():
        match = _NEXT_BLOCK_RE.fullmatch(token)
        if match is None:
            raise ValueError(f"bad block {token!r} in stage plan {plan!r}; expected C<chs> or T<chs>")
        types.append(_NEXT_BLOCK_TYPES[match[1]])
        channels.append(int(match[2]))
    return types, channels


class NextViTBackbone(nn.Module):
    """A plain conv stem at stride 2, then one timm ``NextStage`` per output level.

    Args:
        stages: one plan per level, e.g. ``("C16", "C32 C32", "C64 T64")``: ``C<n>`` a Next
            convolution block, ``T<n>`` a Next transformer block, ``<n>`` output channels.
            Every width must be a multiple of ``head_dim``; a ``T`` block splits its width into
            an attention part (``mix_block_ratio`` of it, rounded to a multiple of 32) and a
            convolution part, and both parts must be positive multiples of ``head_dim``.
        in_channels: channels of the input pseudo-image.
        stem_channels: output channels of each stem conv; only the first one strides.
        strides: stride of each stage's first block; with the stride-2 stem, ``(1, 2, 2)``
            puts the levels at reductions 2, 4, 8.
        sr_ratios: per-stage spatial reduction of the keys/values in attention. Note timm
            pools ``sr_ratio ** 2`` consecutive tokens of the flattened (row-major) map, i.e.
            a 1 x sr^2 strip, not an sr x sr square.
        head_dim: channels per head (attention) and per group (the NCB grouped 3x3 conv).
        mix_block_ratio: attention share of a ``T`` block's width.
        drop_path_rate: stochastic depth, increasing stage by stage.

    Input ``[B, in_channels, H, W]``; output one ``[B, C_i, H / r_i, W / r_i]`` per level.
    """

    def __init__(
            self,
            stages: Sequence[str],
            *,
            in_channels: int,
            stem_channels: Sequence[int],
            strides: Sequence[int] = (1, 2, 2),
            sr_ratios: Sequence[int] = (1, 1, 2),
            head_dim: int = 16,
            mix_block_ratio: float = 0.75,
            drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not len(stages) == len(strides) == len(sr_ratios):
            raise ValueError(f"need one stride and sr_ratio per stage: {len(stages)} stages, "
                             f"strides {strides}, sr_ratios {sr_ratios}")
        act_layer = nn.ReLU
        stem_in = [in_channels, *stem_channels[:-1]]
        self.stem = nn.Sequential(*[
            ConvNormAct(c_in, c_out, kernel_size=3, stride=2 if i == 0 else 1, act_layer=act_layer)
            for i, (c_in, c_out) in enumerate(zip(stem_in, stem_channels))])

        plans = [parse_next_stage(plan) for plan in stages]
        drop_path = calculate_drop_path_rates(drop_path_rate, [len(t) for t, _ in plans], stagewise=True)
        blocks, self.feature_info = [], []
        in_chs, reduction = stem_channels[-1], 2
        for i, ((types, chs), stride, sr_ratio) in enumerate(zip(plans, strides, sr_ratios)):
            blocks.append(NextStage(in_chs, chs, types, stride=stride, sr_ratio=sr_ratio,
                                    mix_block_ratio=mix_block_ratio, drop_path=drop_path[i],
                                    head_dim=head_dim, act_layer=act_layer))
            in_chs, reduction = chs[-1], reduction * stride
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)  # [B, stem_channels[-1], H/2, W/2]
        features = []
        for stage in self.stages:
            x = stage(x)  # [B, C_i, H/r_i, W/r_i]
            features.append(x)
        return features


def _create_nextvit(stages: Sequence[str], *, in_channels: int, stem_channels: Sequence[int],
                    **kwargs: Any) -> NextViTBackbone:
    return NextViTBackbone(stages, in_channels=in_channels, stem_channels=stem_channels, **kwargs)


@register_backbone
def nextvit_tiny(*, in_channels: int, **kwargs: Any) -> NextViTBackbone:
    """Next-ViT-style hybrid for CPU: 16/32/64 channels, one attention block at reduction 8."""
    stages = ("C16", "C32 C32", "C64 T64")
    return _create_nextvit(stages, in_channels=in_channels, stem_channels=(16,), mix_block_ratio=0.5, **kwargs)


@register_backbone
def nextvit_small(*, in_channels: int, **kwargs: Any) -> NextViTBackbone:
    """Next-ViT-style hybrid for GPU: 32/64/128 channels, two attention blocks at reduction 8."""
    stages = ("C32", "C64 C64", "C128 T128 C128 T128")
    return _create_nextvit(stages, in_channels=in_channels, stem_channels=(32, 32), head_dim=32, **kwargs)


# --------------------------------------------------------------------------------------------
# Neck: multi-scale features -> one BEV map at the finest level
# --------------------------------------------------------------------------------------------

class BevNeck(nn.Module):
    """Fuse all levels at the finest one: 1x1 lateral convs, bilinear upsampling, sum, separable 3x3.

    Args:
        feature_info: the backbone's ``feature_info``.
        out_channels: channels of the fused map.
        reduction: the output's stride; one of the levels' reductions (default: the finest).
            Levels finer than it are not used.

    Attributes:
        out_channels: channels of the output.
        reduction: stride of the output w.r.t. the backbone input.

    Input the backbone's list of levels; output ``[B, out_channels, H / reduction, W / reduction]``.
    """

    def __init__(self, feature_info: FeatureInfo, out_channels: int, reduction: int | None = None) -> None:
        super().__init__()
        reductions = [f["reduction"] for f in feature_info]
        if reduction is not None and reduction not in reductions:
            raise ValueError(f"neck reduction {reduction} is not one of the backbone's levels {reductions}")
        self.out_channels = out_channels
        self.reduction: int = reduction if reduction is not None else min(reductions)
        self._finest = reductions.index(self.reduction)
        self._used = [r >= self.reduction for r in reductions]
        self.lateral = nn.ModuleList(ConvNormAct(f["num_chs"], out_channels, kernel_size=1)
                                     if used else nn.Identity() for f, used in zip(feature_info, self._used))
        # Depthwise-separable: a full 3x3 at the finest level would cost more than a tiny backbone.
        self.fuse = SeparableConvNormAct(out_channels, out_channels, kernel_size=3)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[self._finest].shape[-2:]
        fused = None
        for lateral, feature, used in zip(self.lateral, features, self._used):
            if not used:
                continue
            x = lateral(feature)  # [B, out_channels, H/r_i, W/r_i]
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # [B, out, H/2, W/2]
            fused = x if fused is None else fused + x
        return self.fuse(fused)  # [B, out_channels, H/2, W/2]


class BevBackbone(nn.Module):
    """A registered backbone followed by a :class:`BevNeck`: pseudo-image in, one BEV map out.

    Attributes:
        backbone: the multi-scale encoder (its ``feature_info`` describes the levels).
        neck: the fusion of the levels.
        out_channels: channels of the output.
        reduction: stride of the output w.r.t. the input (2).
    """

    def __init__(self, backbone: nn.Module, out_channels: int, reduction: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = BevNeck(backbone.feature_info, out_channels, reduction)
        self.out_channels = out_channels
        self.reduction = self.neck.reduction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)  # [[B, C_i, H/r_i, W/r_i], ...]
        return self.neck(features)  # [B, out_channels, H/2, W/2]


def build_bev_backbone(name: str, *, in_channels: int, out_channels: int, reduction: int | None = None,
                       **kwargs: Any) -> BevBackbone:
    """Build the registered backbone ``name`` with a neck fusing its levels to ``out_channels``
    at stride ``reduction`` (default: the finest level's)."""
    return BevBackbone(build_backbone(name, in_channels=in_channels, **kwargs), out_channels, reduction)
