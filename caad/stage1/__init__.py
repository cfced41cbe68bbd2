"""Stage 1: pseudo-GT answers from audio-derived metadata (template or local causal LM)."""

from caad.stage1.generate import GENERATORS, Stage1Result, generate_pseudo_gt
from caad.stage1.lm import LMGenerator, build_prompt, postprocess
from caad.stage1.templates import contains_label, normalize_text, template_answer

__all__ = [
    "GENERATORS",
    "LMGenerator",
    "Stage1Result",
    "build_prompt",
    "contains_label",
    "generate_pseudo_gt",
    "normalize_text",
    "postprocess",
    "template_answer",
]
