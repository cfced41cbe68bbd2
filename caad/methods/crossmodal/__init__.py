"""Cross-modal knowledge distillation for speech LMs from a text teacher (arXiv 2509.14930).

Method ``crossmodal`` (:mod:`~caad.methods.crossmodal.method`): text-to-text and speech-to-text channels,
KD on the answer tokens plus CE. Its pieces are shared by the other text-teacher methods
(:mod:`caad.methods.sourcewise`, :mod:`caad.methods.layerwise`): the config base
(:mod:`~caad.methods.crossmodal.config`), paired text/speech batches (:mod:`~caad.methods.crossmodal.batch`),
text teachers and ``lm_head`` access (:mod:`~caad.methods.crossmodal.teacher`), the answer-token loss
(:mod:`~caad.methods.crossmodal.loss`).
"""

from caad.methods.crossmodal.batch import CHANNELS, PairedBatch, build_paired_batch, reference_answer, text_query
from caad.methods.crossmodal.config import AnswerKDConfig, CrossModalConfig
from caad.methods.crossmodal.loss import answer_kd_loss
from caad.methods.crossmodal.method import CrossModalMethod
from caad.methods.crossmodal.teacher import Head, head_of, load_text_teacher

__all__ = [
    "CHANNELS",
    "AnswerKDConfig",
    "CrossModalConfig",
    "CrossModalMethod",
    "Head",
    "PairedBatch",
    "answer_kd_loss",
    "build_paired_batch",
    "head_of",
    "load_text_teacher",
    "reference_answer",
    "text_query",
]
