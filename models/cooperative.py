"""One cooperative sample and the four ways of fusing it (pure functions over a detector).

- ``none``: the ego's own LiDAR only.
- ``late``: every agent detects alone; boxes move to the ego frame and are merged by NMS.
- ``early``: every agent's points move to the ego frame and are detected together.
- ``intermediate``: every agent's BEV features are warped into the ego grid and merged.

All coordinates are in *ground frames* (see :mod:`models.bev`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from models.geometry import transform_boxes, transform_points
from models.head import rotated_nms

FusionMode = Literal["none", "late", "early", "intermediate"]
FUSION_MODES: tuple[str, ...] = ("none", "late", "early", "intermediate")


@dataclass(frozen=True, slots=True)
class CameraViews:
    """One camera agent's images and calibration at one time step.

    Attributes:
        names: the cameras' names (for errors).
        images: ``[N, H, W, 3]`` uint8 RGB.
        intrinsics: ``[N, 3, 3]`` pinhole matrices (pixels).
        bev_from_camera: ``[N, 4, 4]`` each camera (OpenCV axes) in the agent's BEV frame.
    """

    names: tuple[str, ...]
    images: np.ndarray  # [N, H, W, 3]
    intrinsics: np.ndarray  # [N, 3, 3]
    bev_from_camera: np.ndarray  # [N, 4, 4]

    def moved(self, new_from_old: np.ndarray) -> CameraViews:
        """The same cameras with the agent's BEV frame moved by ``new_from_old``."""
        return CameraViews(self.names, self.images, self.intrinsics, new_from_old[None] @ self.bev_from_camera)


@dataclass(frozen=True, slots=True)
class CoopSample:
    """What the agents sensed at one time step, ready for a detector.

    Attributes:
        points: per agent ``[N_i, 4]`` float32 x, y, z, intensity in its ground frame; index 0 is the ego.
        ego_from_agent: ``[A, 4, 4]`` each agent's ground frame in the ego's (``[0]`` is identity).
        gt_boxes: ``[M, 7]`` ground truth in the ego ground frame (what is scored).
        agent_gt_boxes: per agent, the ground truth it can see, in its own ground frame (training).
        cameras: per agent, its camera views when it is a camera agent, else ``None`` (empty: LiDAR agents
            only). A camera agent's points are empty.
    """

    points: tuple[np.ndarray, ...]
    ego_from_agent: np.ndarray  # [A, 4, 4]
    gt_boxes: np.ndarray  # [M, 7]
    agent_gt_boxes: tuple[np.ndarray, ...] = ()
    cameras: tuple[CameraViews | None, ...] = ()

    def camera_agents(self) -> list[int]:
        """Indices of the agents that sense with cameras."""
        return [k for k, c in enumerate(self.cameras) if c is not None]


def agent_features(detector, sample: CoopSample, agents: list[int] | None = None) -> torch.Tensor:
    """``[len(agents), C, h, w]`` BEV features of the sample's agents (all by default), each from its
    LiDAR points or, for a camera agent, its images lifted onto the detector's feature grid."""
    device = next(detector.parameters()).device
    agents = list(range(len(sample.points))) if agents is None else agents
    cameras = set(sample.camera_agents())
    out: dict[int, torch.Tensor] = {}
    lidar = [k for k in agents if k not in cameras]
    if lidar:
        for k, f in zip(lidar, detector.features(_to_tensors([sample.points[k] for k in lidar], device))):
            out[k] = f
    seen = [k for k in agents if k in cameras]
    if seen:
        images, samplings = [], []
        for k in seen:
            views = sample.cameras[k]
            height, width = views.images.shape[1:3]
            samplings.append([detector.camera_sampling(n, i, m, height, width)
                              for n, i, m in zip(views.names, views.intrinsics, views.bev_from_camera, strict=True)])
            images.append(torch.from_numpy(np.ascontiguousarray(views.images)).to(device))
        for k, f in zip(seen, detector.camera_features(images, samplings)):
            out[k] = f
    return torch.stack([out[k] for k in agents])


def _to_tensors(points: list[np.ndarray] | tuple[np.ndarray, ...], device: torch.device) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(p)).to(device) for p in points]


@torch.no_grad()
def detect_sample(detector, sample: CoopSample, mode: str, *, score_threshold: float = 0.1) -> np.ndarray:
    """Boxes ``[K, 8]`` (x, y, z, l, w, h, yaw, score) in the ego ground frame for one fusion mode.

    An agent whose cloud is empty and that has no cameras has no evidence and is left out (so are camera
    agents in ``early``: they have no points to pool); with no evidence at all the result is empty (never
    a guess from an empty map).
    """
    if mode not in FUSION_MODES:
        raise ValueError(f"unknown fusion mode {mode!r}; expected one of {', '.join(FUSION_MODES)}")
    device = next(detector.parameters()).device
    cameras = set(sample.camera_agents()) if mode != "early" else set()
    sensing = [k for k, p in enumerate(sample.points) if (len(p) or k in cameras) and (mode != "none" or k == 0)]
    if not sensing:
        return np.zeros((0, 8))
    ego_from_agent = sample.ego_from_agent[sensing]
    if mode == "early":
        merged = np.concatenate([transform_points(m, sample.points[k]) for m, k in zip(ego_from_agent, sensing)])
        features = detector.features(_to_tensors([merged.astype(np.float32)], device))
    else:
        features = agent_features(detector, sample, sensing)
        if mode == "late":
            per_agent = detector.detect(features, score_threshold=score_threshold)
            return merge_late([d[:, :8].cpu().numpy().astype(np.float64) for d in per_agent], ego_from_agent,
                              detector.config.nms_iou_threshold)
        if mode == "intermediate":
            features = detector.fuse(features, torch.as_tensor(ego_from_agent, dtype=torch.float32, device=device))
    dets = detector.detect(features, fused=mode == "intermediate", score_threshold=score_threshold)[0]
    return dets[:, :8].cpu().numpy().astype(np.float64)


def merge_late(per_agent: list[np.ndarray], ego_from_agent: np.ndarray, nms_iou_threshold: float) -> np.ndarray:
    """Late fusion: each agent's boxes ``[K_i, 8]`` (own frame) moved to the ego frame, merged by rotated NMS."""
    merged = np.concatenate([transform_boxes(m, d[:, :8]) for m, d in zip(ego_from_agent, per_agent)]
                            ) if per_agent else np.zeros((0, 8))
    if len(merged) == 0:
        return merged.reshape(0, 8)
    keep = rotated_nms(torch.from_numpy(merged[:, :7]), torch.from_numpy(merged[:, 7]), nms_iou_threshold)
    return merged[keep.numpy()]
