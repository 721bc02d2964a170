"""Models and the shared geometry: frames, transforms, boxes, scoring."""

from models.boxes import bev_iou_matrix, box_corners_3d, box_corners_bev, count_points_in_boxes, points_in_boxes
from models.geometry import (invert_se3, matrix_to_opv2v_pose, opv2v_pose_to_matrix, se2_from_se3, se3_from_xyz_rpy,
                             transform_boxes, transform_points, wrap_angle_rad, yaw_from_matrix)
from models.metrics import IOU_THRESHOLDS, APAccumulator, voc_ap

__all__ = ["IOU_THRESHOLDS", "APAccumulator", "bev_iou_matrix", "box_corners_3d", "box_corners_bev",
           "count_points_in_boxes", "invert_se3", "matrix_to_opv2v_pose", "opv2v_pose_to_matrix", "points_in_boxes",
           "se2_from_se3", "se3_from_xyz_rpy", "transform_boxes", "transform_points", "voc_ap", "wrap_angle_rad",
           "yaw_from_matrix"]
