"""Cameras onto the BEV grid: checking a camera frame and lifting image features to the ground plane.

A camera agent's image features reach the same BEV grid as a LiDAR agent's pillar features through
the ground-plane homography: every BEV cell centre, put on the ground (or at a chosen height above
it), is projected into the camera with its intrinsics and extrinsics, and the image feature map is
read there with bilinear sampling (``torch.nn.functional.grid_sample``), as multi-view pedestrian
detectors (MVDet and its successors) project their feature maps. Cells the camera does not see
(behind it, outside its image) stay zero and are flagged in a mask, so several cameras of one agent
are averaged over the cameras that see each cell.

Cameras use the OpenCV convention (x right, y down, z forward); ``bev_from_camera`` places the camera
in the agent's BEV frame (on the ground under the agent, z up).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import build_bev_backbone
from models.bev import BevGrid

MIN_DEPTH_M = 0.1
"""Cells nearer the camera's image plane than this (or behind it) are not seen."""


class CameraInputError(ValueError):
    """A camera frame or calibration that cannot be lifted; the message names the camera."""


@dataclass(frozen=True, slots=True)
class GroundSampling:
    """Where each BEV cell lies in one camera's image.

    Attributes:
        grid: ``[H, W, 2]`` float32 image coordinates normalised to [-1, 1] (x along the image's
            width, y along its height; ``grid_sample`` with ``align_corners=False``), per BEV cell.
        valid: ``[H, W]`` bool, the camera sees the cell (in front of it and inside its image).
    """

    grid: np.ndarray
    valid: np.ndarray


def check_image(name: str, image: np.ndarray, height_px: int, width_px: int) -> np.ndarray:
    """``image`` as ``[H, W, 3]`` uint8 RGB, or a :class:`CameraInputError` naming ``name`` and what is wrong.

    A frame of another size than the camera's calibration, or in another layout (channels first,
    grey, RGBA, floating point), is refused rather than guessed at.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise CameraInputError(f"camera {name!r}: image must be uint8 RGB, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise CameraInputError(f"camera {name!r}: image must be [H, W, 3] RGB (channels last), got shape "
                               f"{tuple(image.shape)}")
    if image.shape[:2] != (height_px, width_px):
        raise CameraInputError(f"camera {name!r}: image is {image.shape[1]} x {image.shape[0]} px, its "
                               f"calibration is for {width_px} x {height_px} px")
    return image


def _check_calibration(name: str, intrinsic: np.ndarray, bev_from_camera: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    intrinsic = np.asarray(intrinsic, dtype=np.float64)
    pose = np.asarray(bev_from_camera, dtype=np.float64)
    if intrinsic.shape != (3, 3) or not np.all(np.isfinite(intrinsic)):
        raise CameraInputError(f"camera {name!r}: intrinsics must be a finite 3 x 3 matrix, got {intrinsic.tolist()}")
    if intrinsic[0, 0] <= 0 or intrinsic[1, 1] <= 0 or np.any(intrinsic[2] != (0.0, 0.0, 1.0)) or intrinsic[1, 0] != 0:
        raise CameraInputError(f"camera {name!r}: intrinsics are not a pinhole matrix with positive focal "
                               f"lengths: {intrinsic.tolist()}")
    if pose.shape != (4, 4) or not np.all(np.isfinite(pose)):
        raise CameraInputError(f"camera {name!r}: extrinsics must be a finite 4 x 4 matrix")
    rotation = pose[:3, :3]
    if (not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-4) or abs(np.linalg.det(rotation) - 1) > 1e-4
            or np.any(pose[3] != (0.0, 0.0, 0.0, 1.0))):
        raise CameraInputError(f"camera {name!r}: extrinsics are not a rigid transform")
    return intrinsic, pose


def ground_sampling(name: str, intrinsic: np.ndarray, bev_from_camera: np.ndarray, grid: BevGrid,
                    height_px: int, width_px: int, height_m: float = 0.0) -> GroundSampling:
    """Project every cell centre of ``grid`` (at ``height_m`` above the ground) into the camera.

    Args:
        name: the camera's name, for errors.
        intrinsic: ``[3, 3]`` pinhole matrix in pixels of the ``width_px`` x ``height_px`` image.
        bev_from_camera: ``[4, 4]`` the camera (OpenCV axes) in the agent's BEV frame.
        grid: the BEV grid the features go to.
        height_px, width_px: the image size the intrinsics are for (feature maps of any stride that
            cover the same image are sampled with the same normalised grid).
        height_m: the plane's height above the ground (0: the ground, where feet and wheels are).

    Raises:
        CameraInputError: the calibration is not a pinhole camera and a rigid pose, or the camera sees
            no cell of the grid (the plane is behind the camera or outside its image).
    """
    intrinsic, pose = _check_calibration(name, intrinsic, bev_from_camera)
    rows, cols = np.meshgrid(np.arange(grid.height_cells), np.arange(grid.width_cells), indexing="ij")
    xy = grid.cell_centre(rows.ravel(), cols.ravel())
    cells = np.concatenate([xy, np.full((len(xy), 1), height_m), np.ones((len(xy), 1))], axis=1)
    in_camera = (np.linalg.inv(pose) @ cells.T)[:3]  # [3, N]
    depth = in_camera[2]
    in_front = depth > MIN_DEPTH_M
    if not np.any(in_front):
        raise CameraInputError(f"camera {name!r}: the ground plane is behind the camera (no BEV cell lies in "
                               f"front of it; check its extrinsics)")
    pixels = intrinsic @ in_camera
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(in_front, pixels[0] / depth, -1.0)
        v = np.where(in_front, pixels[1] / depth, -1.0)
    valid = in_front & (u >= 0) & (u < width_px) & (v >= 0) & (v < height_px)
    if not np.any(valid):
        raise CameraInputError(f"camera {name!r}: no BEV cell on the ground falls inside its "
                               f"{width_px} x {height_px} image (the ground plane is not in view)")
    normalised = np.stack([2.0 * u / width_px - 1.0, 2.0 * v / height_px - 1.0], axis=1)
    normalised[~valid] = -2.0  # outside the image; the mask zeroes these cells
    shape = (grid.height_cells, grid.width_cells)
    return GroundSampling(grid=normalised.reshape(*shape, 2).astype(np.float32), valid=valid.reshape(shape))


def lift_to_bev(features: torch.Tensor, samplings: list[GroundSampling]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image feature maps of one agent's cameras onto its BEV grid, averaged over the cameras that see each cell.

    Args:
        features: ``[N, C, h, w]`` one feature map per camera (any stride over the whole image).
        samplings: ``N`` :class:`GroundSampling` of the same cameras on the same grid.

    Returns:
        ``[C, H, W]`` the lifted features and ``[H, W]`` how many cameras see each cell (float).
    """
    if len(samplings) != features.shape[0]:
        raise ValueError(f"{features.shape[0]} feature maps for {len(samplings)} cameras")
    grid = torch.as_tensor(np.stack([s.grid for s in samplings]), device=features.device, dtype=features.dtype)
    valid = torch.as_tensor(np.stack([s.valid for s in samplings]), device=features.device, dtype=features.dtype)
    lifted = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
    lifted = lifted * valid[:, None]
    seen = valid.sum(dim=0)
    return lifted.sum(dim=0) / seen.clamp(min=1.0), seen


IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
"""Per-channel normalisation of RGB in [0, 1] (the usual ImageNet statistics)."""


class CameraBevEncoder(nn.Module):
    """One agent's camera images to one BEV feature map: an image backbone from the registry (the same
    MobileDet- and Next-ViT-style families as the LiDAR path, built for 3 input channels) and a neck to
    ``out_channels`` at stride ``reduction``, then :func:`lift_to_bev` onto the agent's feature grid.

    Input ``[N, H, W, 3]`` uint8 images of the agent's ``N`` cameras and their :class:`GroundSampling` on
    the feature grid; output ``[out_channels, H_bev, W_bev]`` and how many cameras see each cell.
    """

    def __init__(self, backbone: str, out_channels: int, reduction: int = 8) -> None:
        super().__init__()
        self.image = build_bev_backbone(backbone, in_channels=3, out_channels=out_channels, reduction=reduction)
        self.out_channels = out_channels
        self.reduction = self.image.reduction
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, H, W, 3]`` uint8 to ``[N, C, H / r, W / r]``."""
        x = images.permute(0, 3, 1, 2).to(self.mean.dtype) / 255.0
        return self.image((x - self.mean) / self.std)

    def forward(self, images: torch.Tensor, samplings: list[GroundSampling]) -> tuple[torch.Tensor, torch.Tensor]:
        return lift_to_bev(self.image_features(images), samplings)
