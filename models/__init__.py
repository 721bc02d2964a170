"""Models and the shared geometry: frames, transforms, boxes, scoring, BEV detectors."""

from models.backbones import BACKBONES, build_backbone, build_bev_backbone, list_backbones, register_backbone
from models.bev import BevGrid, BevGridConfig
from models.boxes import bev_iou_matrix, box_corners_3d, box_corners_bev, count_points_in_boxes, points_in_boxes
from models.cooperative import FUSION_MODES, CoopSample, detect_sample
from models.detector import (BevDetector, CheckpointError, DetectorConfig, build_detector, load_checkpoint,
                             save_checkpoint)
from models.geometry import (invert_se3, matrix_to_opv2v_pose, opv2v_pose_to_matrix, se2_from_se3, se3_from_xyz_rpy,
                             transform_boxes, transform_points, wrap_angle_rad, yaw_from_matrix)
from models.head import CenterHead, HeadOutput, build_targets, compute_loss, decode, rotated_nms
from models.metrics import IOU_THRESHOLDS, APAccumulator, voc_ap
from models.pillars import PillarEncoder
from models.train import OptimConfig, train
from models.warp import AttentionMerge, max_merge, warp_to_ego

__all__ = [
    "BACKBONES", "FUSION_MODES", "IOU_THRESHOLDS", "APAccumulator", "AttentionMerge", "BevDetector", "BevGrid",
    "BevGridConfig", "CenterHead", "CheckpointError", "CoopSample", "DetectorConfig", "HeadOutput", "OptimConfig",
    "PillarEncoder", "bev_iou_matrix", "box_corners_3d", "box_corners_bev", "build_backbone", "build_bev_backbone",
    "build_detector", "build_targets", "compute_loss", "count_points_in_boxes", "decode", "detect_sample",
    "invert_se3", "list_backbones", "load_checkpoint", "matrix_to_opv2v_pose", "max_merge", "opv2v_pose_to_matrix",
    "points_in_boxes", "register_backbone", "rotated_nms", "save_checkpoint", "se2_from_se3", "se3_from_xyz_rpy",
    "train", "transform_boxes", "transform_points", "voc_ap", "warp_to_ego", "wrap_angle_rad", "yaw_from_matrix",
]
