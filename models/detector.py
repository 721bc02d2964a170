"""The BEV detector: pillars -> backbone + neck -> (merge) -> centre head, and its checkpoints.

Stages are separate so the streaming system can cut between them: an agent
computes :meth:`BevDetector.features` and sends them; the fusion node warps
and merges them with :meth:`BevDetector.fuse` and runs :meth:`BevDetector.detect`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from timm.layers import ConvNormAct
from torch import nn

from models.backbones import build_bev_backbone, list_backbones
from models.bev import BevGrid, BevGridConfig
from models.camera import CameraBevEncoder, GroundSampling, ground_sampling
from models.head import CenterHead, HeadOutput, PeakHeadOutput, decode
from models.pillars import PillarEncoder
from models.warp import AttentionMerge, ContextMerge, max_merge, warp_to_ego


Precision = Literal["float32", "bfloat16", "auto"]
"""Arithmetic of inference: ``auto`` is ``bfloat16`` where the hardware computes it natively (CPUs with
AVX-512 BF16 or AMX, CUDA GPUs that support it), else ``float32``."""


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` has native bfloat16 arithmetic (otherwise emulating it is slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable or does not match the configuration."""


class DetectorConfig(BaseModel):
    """Everything that shapes a detector's weights (derived sizes come from the built modules)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: str = "mobiledet_tiny"
    """A registered backbone (``models.backbones.list_backbones()``)."""
    grid: BevGridConfig = BevGridConfig()
    pillar_channels: int = Field(32, ge=4)
    """Channels of the pillar pseudo-image."""
    feature_channels: int = Field(64, ge=4)
    """Channels of the BEV features agents share (the neck's output)."""
    feature_reduction: int = Field(4, ge=1)
    """Stride of the shared features w.r.t. the pillar grid (a backbone level: 2, 4 or 8)."""
    refine_blocks: int = Field(2, ge=0)
    """3x3 conv blocks between the shared features (or their merge) and the head: where the
    fused map learns to combine what the agents sent."""
    head_channels: int = Field(64, ge=4)
    num_classes: int = Field(1, ge=1)
    merge: Literal["max", "attention", "context"] = "attention"
    """How intermediate fusion merges agents' features in each cell: element-wise ``max``, a per-cell
    ``attention`` over agents (a 1x1 score of each agent's features), or ``context`` attention (scores
    that see a 3x3 neighbourhood and the other agents, plus a learned correction; see
    :class:`models.warp.ContextMerge`)."""
    fused_head: bool = False
    """Give the merged map of intermediate fusion its own refinement and head (same shapes as the
    single-agent ones, from which a second stage starts them; see ``optim.trains: fused``): merged
    features of several agents are not one agent's, and the single-agent path stays as it was."""
    fused_hint: bool = False
    """Intermediate fusion also tells the fused map's head what each agent's own head sees: every agent's
    heat-map (the single-agent refinement and head run on that agent's features, at the fusion node) is
    warped into the ego grid with its features, and the most confident agent's value in each cell joins
    the merged features as ``num_classes`` extra input channels of the fused refinement (and, through a
    learned per-class gain that starts at zero, the fused heat-map's logit). Merged features blur an
    object only one agent sees with the empty-looking cells of agents that cover it but cannot see it;
    its own head's verdict survives the merge. Needs ``fused_head`` (a second stage starts it from a
    checkpoint without the hint: the new input weights start at zero, so it starts as that checkpoint)."""
    camera_backbone: str | None = None
    """An image backbone from the same registry for camera agents (``None``: LiDAR agents only). A camera
    agent's images go through it and a neck to ``feature_channels`` at stride ``camera_reduction`` and are
    lifted onto the shared feature grid through the ground plane (:mod:`models.camera`): its features
    then go through the same codec, transport, merge and head as a LiDAR agent's."""
    camera_reduction: int = Field(8, ge=2)
    """Stride of the image features w.r.t. the image (a backbone level: 2, 4 or 8)."""
    nms_iou_threshold: float = Field(0.1, ge=0.0, le=1.0)
    """Rotated-IoU above which the lower-scoring of two boxes is dropped."""
    peak_window: int = Field(3, ge=1)
    """Decoding: the odd window of the heat-map's peak rule (see ``peak_ratio``); 1 makes every cell a
    candidate."""
    peak_ratio: float = Field(0.5, ge=0.0, le=1.0)
    """Decoding: a heat-map cell becomes a candidate box when it scores at least this times the maximum
    of its ``peak_window`` window. 1 is CenterNet's local-maximum rule, which on 2 m cells drops one of
    two cars parked side by side (the weaker peak is the stronger one's neighbour); 0.5 keeps such
    peaks and leaves an object's halo cells (a fraction of its peak) out, and the decoded centres and
    rotated NMS merge what is one object (README: AP and decoding time of 1, 0.5 and every cell)."""

    @field_validator("peak_window")
    @classmethod
    def _odd_window(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"peak_window must be odd (a window centred on a cell), got {value}")
        return value

    @model_validator(mode="after")
    def _hint_needs_fused_head(self) -> DetectorConfig:
        if self.fused_hint and not self.fused_head:
            raise ValueError("fused_hint feeds the fused map's own head: it needs fused_head: true")
        return self

    @property
    def feature_cell_m(self) -> float:
        """Edge of one cell of the shared feature map: the lattice agents' BEV frames sit on."""
        return self.grid.cell_size_m * self.feature_reduction


class BevDetector(nn.Module):
    """A single-stage BEV detector that can fuse several agents' features.

    Args:
        config: its configuration (kept for checkpoints).
        encoder: points -> ``[B, P, H, W]`` pseudo-image.
        backbone: pseudo-image -> ``[B, C, H/s, W/s]`` features, with ``out_channels`` and ``reduction``.
        refine: features (one agent's, or merged) -> features of the same shape, before the head.
        head: features -> :class:`HeadOutput`.
        merge: ``None`` for the element-wise max, else a module ``(features, coverage) -> merged``.
        fused_refine, fused_head: the refinement and head of merged maps (``None``: the same as one agent's).
        hint: with ``config.fused_hint``, the gain of the agents' own heat-maps in the fused one.
    """

    def __init__(self, config: DetectorConfig, encoder: PillarEncoder, backbone: nn.Module, refine: nn.Module,
                 head: CenterHead, merge: nn.Module | None, fused_refine: nn.Module | None = None,
                 fused_head: CenterHead | None = None, hint: HintGain | None = None,
                 camera: CameraBevEncoder | None = None) -> None:
        super().__init__()
        self.config = config
        self.grid: BevGrid = encoder.grid
        self.encoder = encoder
        self.backbone = backbone
        self.refine = refine
        self.head = head
        self.merge = merge
        self.fused_refine = fused_refine
        self.fused_head = fused_head
        self.hint = hint
        self.camera = camera
        self.compute_dtype: torch.dtype | None = None  # see set_precision

    def set_precision(self, precision: Precision) -> str:
        """Run the backbone, refinement and head in ``precision`` at inference (training stays float32).

        Features and head outputs are handed on as float32 either way, so codecs, merges and
        decoding see the same types. Returns the precision chosen (``auto`` resolved).
        """
        device = next(self.parameters()).device
        if precision == "auto":
            precision = "bfloat16" if native_bfloat16(device) else "float32"
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"unknown precision {precision!r}; expected float32, bfloat16 or auto")
        self.compute_dtype = torch.bfloat16 if precision == "bfloat16" else None
        return precision

    def _autocast(self):
        if self.compute_dtype is None or self.training:
            return nullcontext()
        return torch.autocast(next(self.parameters()).device.type, dtype=self.compute_dtype)

    @property
    def feature_cell_m(self) -> float:
        """Edge of one cell of the shared feature map (metres)."""
        return self.grid.cell_size_m * self.stride

    @property
    def stride(self) -> int:
        """Cells of the pillar grid per cell of the feature map."""
        return int(self.backbone.reduction)

    def features(self, points: list[torch.Tensor]) -> torch.Tensor:
        """Per-sample point clouds (ground frame) -> BEV features ``[B, C, H/s, W/s]`` (float32)."""
        image = self.encoder(points)
        with self._autocast():
            return self.backbone(image).float()

    @property
    def feature_grid(self) -> BevGrid:
        """The grid of the shared feature map: the pillar grid's extent in ``feature_cell_m`` cells."""
        g = self.grid
        return BevGrid(g.x_min_m, g.x_max_m, g.y_min_m, g.y_max_m, self.feature_cell_m, g.z_min_m, g.z_max_m)

    def camera_sampling(self, name: str, intrinsic, bev_from_camera, height_px: int, width_px: int) -> GroundSampling:
        """Where each cell of :attr:`feature_grid` lies in a camera's image (see :func:`models.camera.ground_sampling`)."""
        return ground_sampling(name, intrinsic, bev_from_camera, self.feature_grid, height_px, width_px)

    def camera_features(self, images: list[torch.Tensor], samplings: list[list[GroundSampling]]) -> torch.Tensor:
        """Per-agent camera images ``[N_i, H, W, 3]`` uint8 and their samplings -> BEV features ``[B, C, h, w]``,
        each agent's cameras averaged where several see a cell (float32).

        Raises:
            ValueError: the detector has no camera backbone (``camera_backbone`` is ``None``).
        """
        if self.camera is None:
            raise ValueError("this detector has no camera path (camera_backbone is not set)")
        with self._autocast():
            return torch.stack([self.camera(i, s)[0] for i, s in zip(images, samplings, strict=True)]).float()

    def lift_cameras(self, images: torch.Tensor, samplings: list[GroundSampling]) -> tuple[torch.Tensor, torch.Tensor]:
        """One agent's cameras ``[N, H, W, 3]`` uint8 (one size) -> ``[C, h, w]`` BEV features (float32, averaged
        over the cameras that see each cell) and ``[h, w]`` how many cameras see each cell."""
        if self.camera is None:
            raise ValueError("this detector has no camera path (camera_backbone is not set)")
        with self._autocast():
            features, seen = self.camera(images, samplings)
        return features.float(), seen.float()

    def fuse(self, features: torch.Tensor, ego_from_agent: torch.Tensor,
             valid: torch.Tensor | None = None) -> torch.Tensor:
        """Agents' features ``[N, C, h, w]`` (index 0 the ego) -> merged ``[1, C, h, w]`` in the ego grid.

        ``valid`` ``[N, 1, h, w]`` (optional) marks the cells each agent actually delivered
        (e.g. the tiles that arrived); elsewhere that agent is treated as not covering the cell
        (a value between 0 and 1 weights its evidence down). With ``config.fused_hint`` the result
        has ``num_classes`` more channels: the agents' own heat-maps (probabilities), warped, each
        weighted by its coverage, max over agents (see :attr:`DetectorConfig.fused_hint`).
        """
        channels = features.shape[1]
        if self.hint is not None:
            with torch.no_grad(), self._autocast():  # an input of the fused head, not something it trains
                own = torch.sigmoid(self.head.infer(self.refine(features)).heatmap.float())  # [N, K, h, w]
            features = torch.cat([features, own], dim=1)
        warped, coverage = warp_to_ego(features, ego_from_agent, self.grid)
        if valid is not None:
            coverage = coverage * warp_to_ego(valid.to(features.dtype), ego_from_agent, self.grid, mode="nearest")[0]
        warped, own = warped[:, :channels], warped[:, channels:]
        merged = max_merge(warped, coverage) if self.merge is None else self.merge(warped, coverage)
        if self.hint is None:
            return merged
        return torch.cat([merged, (own * coverage).amax(dim=0, keepdim=True)], dim=1)

    def _stages(self, fused: bool) -> tuple[nn.Module, CenterHead]:
        if fused and self.fused_head is not None:
            return self.fused_refine, self.fused_head
        return self.refine, self.head

    def forward(self, features: torch.Tensor, fused: bool = False) -> HeadOutput:
        """One agent's features (or, with ``fused``, a merge of several agents' from :meth:`fuse`)
        ``[B, C, h, w]`` -> dense head outputs (what the loss compares)."""
        refine, head = self._stages(fused)
        out = head(refine(features))
        if fused and self.hint is not None:
            out = replace(out, heatmap=self.hint(out.heatmap, features[:, -self.config.num_classes:]))
        return out

    def infer(self, features: torch.Tensor, fused: bool = False) -> PeakHeadOutput:
        """Features -> head outputs for decoding: the same numbers as :meth:`forward`, but the box
        regressions are computed only at the cells the decoder picks (a third of the head's cost)."""
        refine, head = self._stages(fused)
        with self._autocast():
            out = head.infer(refine(features))
        heatmap = out.heatmap.float()
        if fused and self.hint is not None:
            heatmap = self.hint(heatmap, features[:, -self.config.num_classes:].float())
        return replace(out, heatmap=heatmap, shared=out.shared.float())

    def detect(self, features: torch.Tensor, *, fused: bool = False, score_threshold: float = 0.1,
               max_detections: int = 100) -> list[torch.Tensor]:
        """Features (``fused``: merged by :meth:`fuse`) -> per-sample boxes ``[K, 9]`` (x, y, z, l, w, h, yaw,
        score, label)."""
        return self.decode(self.infer(features, fused), score_threshold=score_threshold,
                           max_detections=max_detections)

    def set_decoder(self, *, peak_window: int | None = None, peak_ratio: float | None = None) -> None:
        """Decode with another peak rule (a decoding choice, not a weight: any checkpoint can use any);
        ``None`` keeps the current value. Raises pydantic's ValidationError for a value the config refuses."""
        changes = {k: v for k, v in (("peak_window", peak_window), ("peak_ratio", peak_ratio)) if v is not None}
        self.config = DetectorConfig.model_validate({**self.config.model_dump(), **changes})

    def decode(self, out: HeadOutput | PeakHeadOutput, *, score_threshold: float = 0.1,
               max_detections: int = 100) -> list[torch.Tensor]:
        """Head outputs -> per-sample boxes ``[K, 9]`` (see :func:`models.head.decode`)."""
        return decode(out, self.grid, self.stride, score_threshold=score_threshold,
                      max_detections=max_detections, nms_iou_threshold=self.config.nms_iou_threshold,
                      peak_window=self.config.peak_window, peak_ratio=self.config.peak_ratio)

    @staticmethod
    def relevance(out: HeadOutput | PeakHeadOutput) -> torch.Tensor:
        """``[B, h, w]`` in [0, 1]: the head's confidence that some object is centred in each cell."""
        return torch.sigmoid(out.heatmap).amax(dim=1)


class HintGain(nn.Module):
    """Adds the agents' own heat-map to the fused one: ``logit + gain * logit(hint)`` per class
    (``gain`` starts at zero: a fused head trained without the hint is unchanged at first)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(num_classes))

    def forward(self, heatmap: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
        return heatmap + self.gain[None, :, None, None] * torch.logit(hint, eps=1e-4)


def build_detector(config: DetectorConfig) -> BevDetector:
    """Build a detector; channel counts are read from the built modules."""
    if config.backbone not in list_backbones():
        raise ValueError(f"unknown backbone {config.backbone!r}; known: {', '.join(list_backbones())}")
    grid = config.grid.build()
    encoder = PillarEncoder(grid, out_channels=config.pillar_channels)
    backbone = build_bev_backbone(config.backbone, in_channels=encoder.out_channels,
                                  out_channels=config.feature_channels, reduction=config.feature_reduction)
    channels = backbone.out_channels

    def refine_and_head(extra: int = 0) -> tuple[nn.Module, CenterHead]:
        """``extra`` more input channels (the fused hint) go to the first layer, whichever it is."""
        refine = nn.Sequential(*(ConvNormAct(channels + (extra if k == 0 else 0), channels, kernel_size=3)
                                 for k in range(config.refine_blocks)))
        head_in = channels + (extra if config.refine_blocks == 0 else 0)
        return refine, CenterHead(head_in, num_classes=config.num_classes, head_channels=config.head_channels)

    refine, head = refine_and_head()
    merge = {"attention": AttentionMerge, "context": ContextMerge}.get(config.merge)
    merge = merge(channels) if merge is not None else None
    hint = config.num_classes if config.fused_hint else 0
    fused_refine, fused_head = refine_and_head(hint) if config.fused_head else (None, None)
    camera = None
    if config.camera_backbone is not None:
        if config.camera_backbone not in list_backbones():
            raise ValueError(f"unknown camera backbone {config.camera_backbone!r}; known: {', '.join(list_backbones())}")
        camera = CameraBevEncoder(config.camera_backbone, channels, config.camera_reduction)
    return BevDetector(config, encoder, backbone, refine, head, merge, fused_refine, fused_head,
                       HintGain(config.num_classes) if config.fused_hint else None, camera)


def save_checkpoint(path: Path, detector: BevDetector, **extra) -> None:
    """Weights with the config that built them (and anything else, e.g. the training step)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"config": detector.config.model_dump(mode="json"), "state_dict": detector.state_dict(), **extra}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, config: DetectorConfig | None = None,
                    map_location: str | torch.device = "cpu") -> tuple[BevDetector, dict]:
    """Build the detector a checkpoint was trained with and load its weights.

    Args:
        path: the checkpoint file.
        config: when given, the checkpoint must have been trained with exactly this config.

    Raises:
        CheckpointError: unreadable file, or a config/weights mismatch (the message names both sides).
    """
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a corrupt file fails inside pickle/zip with any error type
        raise CheckpointError(f"{path}: cannot load checkpoint: {err!r}") from err
    try:
        saved = DetectorConfig.model_validate(blob["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: checkpoint has no valid detector config: {err}") from err
    if config is not None and config != saved:
        diff = {k: (v, getattr(saved, k)) for k, v in config if v != getattr(saved, k)}
        raise CheckpointError(f"{path}: checkpoint was trained with a different config: " + "; ".join(
            f"{k}: wanted {a!r}, checkpoint has {b!r}" for k, (a, b) in diff.items()))
    if not isinstance(blob.get("state_dict"), dict):
        raise CheckpointError(f"{path}: checkpoint has no state_dict")
    detector = build_detector(saved)
    try:
        detector.load_state_dict(blob["state_dict"])
    except RuntimeError as err:
        first = str(err).splitlines()[0:3]
        raise CheckpointError(f"{path}: weights do not fit backbone {saved.backbone!r}: {' '.join(first)}") from err
    return detector, {k: v for k, v in blob.items() if k not in ("config", "state_dict")}
