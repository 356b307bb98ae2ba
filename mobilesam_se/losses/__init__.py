"""Training losses: per-mask terms and the matched segment-everything loss."""
from mobilesam_se.losses.everything import EverythingLoss
from mobilesam_se.losses.mask import dice_loss, iou_confidence_bce, iou_mse, sigmoid_bce, sigmoid_focal

__all__ = ["EverythingLoss", "dice_loss", "iou_confidence_bce", "iou_mse", "sigmoid_bce", "sigmoid_focal"]
