"""Inference: segment everything (SAM's automatic mask generator, made cheaper), outputs."""
from mobilesam_se.inference.amg import EverythingGenerator, MaskSet, crop_boxes, layer_point_grids

__all__ = ["EverythingGenerator", "MaskSet", "crop_boxes", "layer_point_grids"]
