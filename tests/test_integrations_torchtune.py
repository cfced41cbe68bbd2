"""The torchtune-convention KD losses against a reference of torchtune's own (written here, torch only)."""

from __future__ import annotations

import pytest
import torch

from caad_kernels.integrations.torchtune import ForwardKLLoss, ForwardKLWithChunkedOutputLoss

IGNORE = -100


def torchtune_forward_kl(student, teacher, labels, normalize=True, ignore_index=IGNORE):
    """torchtune's ForwardKLLoss: -sum_v p log q per row, rows with ignore_index dropped, mean over valid rows."""
    p = torch.softmax(teacher.double(), dim=-1)
    log_q = torch.log_softmax(student.double(), dim=-1)
    per_row = -(p * log_q).sum(dim=-1).reshape(-1)
    valid = (labels.reshape(-1) != ignore_index).double()
    total = (per_row * valid).sum()
    if not normalize:
        return total
    if valid.sum() == 0:
        return torch.zeros((), dtype=torch.float64)
    return total / valid.sum()


def torchtune_chunked(student_chunks, teacher_chunks, labels):
    student = torch.cat(student_chunks, dim=1)
    teacher = torch.cat(teacher_chunks, dim=1)
    return torchtune_forward_kl(student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1]),
                                labels.reshape(-1))


def _labels(shape, vocab, generator, ignored=0.3):
    labels = torch.randint(0, vocab, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < ignored] = IGNORE
    return labels


def _grad(loss, tensor):
    (grad,) = torch.autograd.grad(loss, tensor)
    return grad


@pytest.mark.parametrize("normalize", [True, False])
def test_forward_kl_matches_torchtune(normalize):
    g = torch.Generator().manual_seed(0)
    rows, vocab = 37, 301
    student = (3 * torch.randn(rows, vocab, generator=g)).requires_grad_()
    teacher = 3 * torch.randn(rows, vocab, generator=g)
    labels = _labels((rows,), vocab, g)
    ours = ForwardKLLoss()(student, teacher, labels, normalize=normalize)
    ref = torchtune_forward_kl(student, teacher, labels, normalize=normalize)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_grad(ours, student).double(), _grad(ref, student).double(), rtol=1e-4, atol=1e-7)


def test_forward_kl_without_teacher_entropy_is_the_kl_with_the_same_gradient():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 5, 64, generator=g, requires_grad=True)
    teacher = torch.randn(2, 5, 64, generator=g)
    labels = _labels((2, 5), 64, g)
    full = ForwardKLLoss()(student, teacher, labels)
    kl = ForwardKLLoss(include_teacher_entropy=False)(student, teacher, labels)
    p = torch.softmax(teacher.double(), -1)
    entropy = -(p * p.log()).sum(-1)
    valid = labels != IGNORE
    torch.testing.assert_close((full - kl).double(), entropy[valid].mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_grad(full, student), _grad(kl, student), rtol=1e-5, atol=1e-8)
    assert ForwardKLLoss(include_teacher_entropy=False)(teacher, teacher, labels).abs() < 1e-5


def test_chunked_matches_torchtune_with_uneven_chunks_and_bf16():
    g = torch.Generator().manual_seed(2)
    batch, seq, vocab = 3, 11, 257
    student = (2 * torch.randn(batch, seq, vocab, generator=g)).requires_grad_()
    teacher = 2 * torch.randn(batch, seq, vocab, generator=g)
    labels = _labels((batch, seq), vocab, g)
    student_chunks = list(student.chunk(4, dim=1))  # 3, 3, 3, 2 positions
    teacher_chunks = list(teacher.chunk(4, dim=1))
    loss_fn = ForwardKLWithChunkedOutputLoss(num_output_chunks=4)
    ours = loss_fn(student_chunks, teacher_chunks, labels)
    ref = torchtune_chunked(student_chunks, teacher_chunks, labels)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_grad(ours, student).double(), _grad(ref, student).double(), rtol=1e-4, atol=1e-7)

    half = [c.detach().bfloat16().requires_grad_() for c in student_chunks]
    ours_bf16 = loss_fn(half, [c.bfloat16() for c in teacher_chunks], labels)
    torch.testing.assert_close(ours_bf16.double(), ref.detach(), rtol=2e-2, atol=2e-2)
    ours_bf16.backward()
    assert all(c.grad.dtype == torch.bfloat16 for c in half)


def test_chunked_all_ignored_gives_zero_and_no_nan():
    student = [torch.randn(2, 3, 16, requires_grad=True) for _ in range(2)]
    teacher = [torch.randn(2, 3, 16) for _ in range(2)]
    labels = torch.full((2, 6), IGNORE)
    loss = ForwardKLWithChunkedOutputLoss(num_output_chunks=2)(student, teacher, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.count_nonzero(c.grad) == 0 for c in student)


def test_wider_teacher_vocabulary_and_contrastive_teacher():
    g = torch.Generator().manual_seed(3)
    rows, vocab = 9, 50
    student = torch.randn(rows, vocab, generator=g, requires_grad=True)
    teacher = torch.randn(rows, vocab + 7, generator=g)
    negative = torch.randn(rows, vocab + 7, generator=g)
    labels = _labels((rows,), vocab, g)
    ours = ForwardKLLoss()(student, teacher, labels)
    torch.testing.assert_close(ours.double(), torchtune_forward_kl(student, teacher[:, :vocab], labels), rtol=1e-5,
                               atol=1e-5)
    alpha = 1.5
    contrastive = ForwardKLLoss(alpha=alpha)(student, teacher, labels, teacher_negative_logits=negative)
    z_hat = teacher[:, :vocab] + alpha * (teacher[:, :vocab] - negative[:, :vocab])
    torch.testing.assert_close(contrastive.double(), torchtune_forward_kl(student, z_hat, labels), rtol=1e-5,
                               atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    loss_fn = ForwardKLWithChunkedOutputLoss(num_output_chunks=2)
    student = [torch.randn(1, 2, 8)] * 2
    with pytest.raises(TypeError, match="lists of chunks"):
        loss_fn(torch.randn(1, 4, 8), torch.randn(1, 4, 8), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="same length"):
        loss_fn(student, student[:1], torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="summing to labels"):
        loss_fn(student, student, torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="leading shape"):
        ForwardKLLoss()(torch.randn(4, 8), torch.randn(4, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="num_output_chunks"):
        ForwardKLWithChunkedOutputLoss(num_output_chunks=0)
