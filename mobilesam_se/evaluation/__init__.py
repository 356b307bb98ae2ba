"""Evaluation metrics for segment-everything predictions."""
from mobilesam_se.evaluation.metrics import aggregate, evaluate_image, mask_nms

__all__ = ["aggregate", "evaluate_image", "mask_nms"]
