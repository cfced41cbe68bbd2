"""Helpers shared by tests/test_methods_*.py: a tiny spoken-QA set and tiny saved models on one tokenizer.

Not a conftest (tests/conftest.py belongs to the data fixtures); import it from a test module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

#: A small spoken-QA set: 12 utterances (9 train, 1 validation, 2 test), two voices.
SET_ARGS = dict(
    num_examples=12, seed=0, voices=("m3", "f3"), rates=(160,), pitches=(50,), splits=(0.75, 0.1, 0.15), progress=False
)


@dataclass(frozen=True)
class MethodModels:
    """A spoken-QA set and tiny checkpoints sharing one tokenizer: a text teacher (Llama, hidden 128,
    padded vocabulary), an acoustic teacher (Qwen2-Audio, hidden 128) and a student (composite, hidden 64)."""

    root: Path
    train: Path
    validation: Path
    text_teacher: Path
    acoustic_teacher: Path
    student: Path


def prepare_methods(root: Path) -> MethodModels:
    from caad.data.spoken_qa import qa_tokenizer_texts, synthesize_spoken_qa
    from caad.data.spoken_qa_items import all_items
    from caad.models import tiny_student, tiny_teacher, train_tokenizer
    from caad.models.text_lm import build_tiny_text_lm, save_text_lm

    root.mkdir(parents=True, exist_ok=True)
    paths = synthesize_spoken_qa(root / "set", **SET_ARGS)
    tokenizer = train_tokenizer(qa_tokenizer_texts(all_items()), vocab_size=400)
    save_text_lm(build_tiny_text_lm(tokenizer, seed=0), tokenizer, root / "text_teacher")
    tiny_teacher(tokenizer, seed=0).save_pretrained(root / "acoustic_teacher")
    tiny_student(tokenizer, seed=1).save_pretrained(root / "student")
    return MethodModels(
        root=root,
        train=paths.train,
        validation=paths.validation,
        text_teacher=root / "text_teacher",
        acoustic_teacher=root / "acoustic_teacher",
        student=root / "student",
    )


def trainer_settings(models: MethodModels, output_dir: Path, **overrides: object) -> dict:
    """A small trainer section (fast on CPU)."""
    settings = dict(
        train_manifest=str(models.train),
        student=str(models.student),
        output_dir=str(output_dir),
        batch_size=3,
        max_steps=2,
        lr=3.0e-3,
        scheduler="constant",
        progress=False,
        tensorboard=False,
    )
    settings.update(overrides)
    return settings


class FakeStep:
    """A :class:`caad.train.StepContext` stand-in without an engine: the student runs directly, gathers are
    no-ops, ``backward`` runs autograd (for testing a method's ``loss_step`` alone)."""

    def __init__(self, student, extra=None, num_items: int = 1, with_components: bool = True, training=True):
        self.model = student
        self.extra = torch.nn.ModuleDict(extra or {})
        self.num_items = num_items
        self.with_components = with_components
        self.training = training
        self.backward_done = False

    def student(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def run(self, fn, *args, **kwargs):
        return fn(self.model, self.extra, *args, **kwargs)

    def gathered(self, *params):
        import contextlib

        return contextlib.nullcontext()

    def backward(self, loss):
        assert not self.backward_done
        self.backward_done = True
        if self.training:
            loss.backward()


def setup_context(student):
    """A :class:`caad.train.SetupContext` for calling a method's ``build_teachers``/``extra_modules`` without
    the trainer: float32 on the CPU, teachers loaded frozen with the given loader."""
    from caad.models import load_speech_lm
    from caad.train import SetupContext

    def load_frozen(path, loader=load_speech_lm):
        model = loader(str(path), dtype=torch.float32, device=torch.device("cpu"))
        model.requires_grad_(False)
        return model.eval()

    return SetupContext(
        student=student, device=torch.device("cpu"), dtype=torch.float32, rank=0, world_size=1, load_frozen=load_frozen
    )


def naive_answer_loss(student_logits, teacher_logits, labels, *, tau, kd_weight, ce_weight):
    """Per-row ``kd_weight * KL(softmax(t / tau) || softmax(s / tau)) * tau^2 + ce_weight * CE(s, y)``, fully
    materialised (teacher columns past the student's vocabulary dropped): the reference of the fused op."""
    vocab = student_logits.shape[-1]
    t = teacher_logits[:, :vocab].double() / tau
    s = student_logits.double()
    log_p = torch.log_softmax(t, dim=-1)
    log_q = torch.log_softmax(s / tau, dim=-1)
    kd = (log_p.exp() * (log_p - log_q)).sum(-1) * tau**2
    ce = torch.nn.functional.cross_entropy(s, labels, reduction="none")
    return kd_weight * kd + ce_weight * ce, kd, ce


def text_logits(model, batch):
    """``[B, T, V]`` logits of a Hugging Face causal LM on a :class:`caad.models.text_lm.TextBatch`."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits


def answer_positions(labels):
    """``[N]`` logits rows (``[:, :-1]`` then packed) that predict answer tokens, as a mask of ``[B, T-1]``."""
    from caad.models import IGNORE_INDEX

    return labels[:, 1:] != IGNORE_INDEX
