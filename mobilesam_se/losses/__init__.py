"""Training losses: per-mask terms (one implementation each) and the matched segment-everything loss."""
from mobilesam_se.losses.everything import EverythingLoss, LossOutput
from mobilesam_se.losses.mask import (bce_per_mask, dice_loss, dice_per_mask, focal_per_mask, iou_confidence_bce,
                                      iou_mse, sigmoid_bce, sigmoid_focal)

__all__ = ["EverythingLoss", "LossOutput", "bce_per_mask", "dice_loss", "dice_per_mask", "focal_per_mask", "iou_confidence_bce",
           "iou_mse", "sigmoid_bce", "sigmoid_focal"]
