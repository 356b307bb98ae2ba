"""Prompted (ordinary SAM) fine-tuning: `prompted.mode=single` and the prompted half of `mixed`."""
from mobilesam_se.prompted.clicks import Click, corrective_click, interior_point
from mobilesam_se.prompted.loss import PromptedLossWeights, best_candidate_loss
from mobilesam_se.prompted.sampling import ObjectPrompts, PromptSampling, sample_prompts
from mobilesam_se.prompted.step import PromptedLoss, build_prompted_loss

__all__ = [
    "Click", "ObjectPrompts", "PromptSampling", "PromptedLoss", "PromptedLossWeights", "best_candidate_loss",
    "build_prompted_loss", "corrective_click", "interior_point", "sample_prompts",
]
