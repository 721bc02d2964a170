"""Models and the shared geometry: frames, transforms, boxes, scoring, BEV detectors, the feature codec."""

from models.backbones import BACKBONES, build_backbone, build_bev_backbone, list_backbones, register_backbone
from models.bev import BevGrid, BevGridConfig, aligned_bev_frame
from models.boxes import bev_iou_matrix, box_corners_3d, box_corners_bev, count_points_in_boxes, points_in_boxes
from models.codec import (CodecConfig, CodecError, CodedFrame, CodedTile, FeatureCodec, ReceiveStats, receive,
                          select_tiles)
from models.codec_train import CodecOptimConfig, load_codec, save_codec, train_codec
from models.cooperative import FUSION_MODES, CoopSample, detect_sample, merge_late
from models.detector import (BevDetector, CheckpointError, DetectorConfig, build_detector, load_checkpoint,
                             save_checkpoint)
from models.geometry import (invert_se3, matrix_to_opv2v_pose, opv2v_pose_to_matrix, se2_from_se3, se3_from_xyz_rpy,
                             transform_boxes, transform_points, wrap_angle_rad, yaw_from_matrix)
from models.head import CenterHead, HeadOutput, build_targets, compute_loss, decode, rotated_nms
from models.metrics import IOU_THRESHOLDS, APAccumulator, voc_ap
from models.pillars import PillarEncoder
from models.train import OptimConfig, mirror, rotate_scene, train
from models.warp import AttentionMerge, max_merge, warp_to_ego

__all__ = [
    "CodecConfig", "CodecError", "CodecOptimConfig", "CodedFrame", "CodedTile", "FeatureCodec", "ReceiveStats",
    "aligned_bev_frame", "load_codec", "merge_late", "mirror", "receive", "rotate_scene", "save_codec",
    "select_tiles", "train_codec",
    "BACKBONES", "FUSION_MODES", "IOU_THRESHOLDS", "APAccumulator", "AttentionMerge", "BevDetector", "BevGrid",
    "BevGridConfig", "CenterHead", "CheckpointError", "CoopSample", "DetectorConfig", "HeadOutput", "OptimConfig",
    "PillarEncoder", "bev_iou_matrix", "box_corners_3d", "box_corners_bev", "build_backbone", "build_bev_backbone",
    "build_detector", "build_targets", "compute_loss", "count_points_in_boxes", "decode", "detect_sample",
    "invert_se3", "list_backbones", "load_checkpoint", "matrix_to_opv2v_pose", "max_merge", "opv2v_pose_to_matrix",
    "points_in_boxes", "register_backbone", "rotated_nms", "save_checkpoint", "se2_from_se3", "se3_from_xyz_rpy",
    "train", "transform_boxes", "transform_points", "voc_ap", "warp_to_ego", "wrap_angle_rad", "yaw_from_matrix",
]
