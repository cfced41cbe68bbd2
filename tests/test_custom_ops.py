"""The ``torch.library`` custom-op path of both losses: the same numbers as the eager ``autograd.Function`` path,
``torch.compile(fullgraph=True)`` of a training step, and ``num_items_in_batch = 0``."""

from __future__ import annotations

import pytest
import torch

from caad_kernels import contrastive_kd_loss, fused_linear_contrastive_kd_loss
from caad_kernels.custom_ops import eager_custom_ops
from caad_kernels.reference import contrastive_kd_loss_reference, fused_linear_contrastive_kd_loss_reference


def logits_inputs(seed=0, vocab=37):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(2, 5, vocab, generator=g) * 2).requires_grad_(True)
    teacher = torch.randn(2, 5, vocab + 4, generator=g) * 2
    negative = teacher + torch.randn(2, 5, vocab + 4, generator=g)
    labels = torch.randint(0, vocab, (2, 5), generator=g)
    labels[0, 1] = -100
    return student, teacher, negative, labels


def fused_inputs(seed=0, vocab=37):
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        student_hidden=torch.randn(2, 5, 16, generator=g).requires_grad_(True),
        student_weight=(torch.randn(vocab, 16, generator=g) * 0.5).requires_grad_(True),
        teacher_hidden=torch.randn(2, 5, 24, generator=g),
        teacher_weight=torch.randn(vocab + 4, 24, generator=g) * 0.5,
        teacher_negative_hidden=torch.randn(2, 5, 24, generator=g),
        labels=torch.randint(0, vocab, (2, 5), generator=g),
        student_bias=torch.randn(vocab, generator=g).requires_grad_(True),
    )
    inputs["labels"][1, 3:] = -100
    return inputs


def student_params(inputs):
    return [inputs[k] for k in ("student_hidden", "student_weight", "student_bias")]


def both_paths(run):
    """``run()`` on the eager autograd.Function path and on the custom-op path: ``[(loss, grads), ...]``."""
    results = []
    for custom in (False, True):
        with eager_custom_ops(custom):
            results.append(run())
    return results


def assert_same(results):
    (loss, grads), (op_loss, op_grads) = results
    torch.testing.assert_close(op_loss, loss, rtol=1e-6, atol=1e-7)
    for grad, op_grad in zip(grads, op_grads):
        assert op_grad.dtype == grad.dtype
        torch.testing.assert_close(op_grad, grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "options",
    [
        dict(alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.3, num_items_in_batch=torch.tensor(7)),
        dict(alpha="per_row", beta=0.5, plausibility=0.05, reduction="none", mask="mask"),
        dict(alpha=1.0, beta=1.0, temperature_scaling=False, reduction="sum", student_softcap=4.0),
    ],
)
@pytest.mark.parametrize("op", ["logits", "fused"])
def test_custom_op_path_equals_the_eager_path(op, options):
    options = dict(options)
    if options.get("alpha") == "per_row":
        options["alpha"] = torch.rand(2, 5, generator=torch.Generator().manual_seed(1)) * 2
    if options.get("mask") == "mask":
        options["mask"] = torch.tensor([[True, False, True, True, True], [True, True, True, False, True]])
    if op == "logits":
        student, teacher, negative, labels = logits_inputs(seed=1)

        def run():
            loss = contrastive_kd_loss(student, teacher, negative, labels, **options)
            return loss, torch.autograd.grad(loss.sum(), student)
    else:
        inputs = fused_inputs(seed=1)

        def run():
            loss = fused_linear_contrastive_kd_loss(**inputs, chunk_size=4, **options)
            return loss, torch.autograd.grad(loss.sum(), student_params(inputs))

    assert_same(both_paths(run))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_custom_op_path_with_a_topk_teacher(reduction):
    student, teacher, _, labels = logits_inputs(seed=6)
    inputs = fused_inputs(seed=6)
    values, indices = torch.log_softmax(teacher[..., :37] / 2.0, dim=-1).topk(6, dim=-1)
    options = dict(teacher_topk_indices=indices, teacher_topk_logprobs=values, temperature=2.0, beta=0.5,
                   ce_weight=0.3, reduction=reduction)

    def run_logits():
        loss = contrastive_kd_loss(student, None, None, labels, **options)
        return loss, torch.autograd.grad(loss.sum(), student)

    def run_fused():
        loss = fused_linear_contrastive_kd_loss(inputs["student_hidden"], inputs["student_weight"], None, None,
                                                labels=inputs["labels"], student_bias=inputs["student_bias"],
                                                chunk_size=4, **options)
        return loss, torch.autograd.grad(loss.sum(), student_params(inputs))

    assert_same(both_paths(run_logits))
    assert_same(both_paths(run_fused))


def test_custom_op_path_refuses_a_backward_through_one_component():
    inputs = fused_inputs(seed=2)
    with eager_custom_ops():
        out = fused_linear_contrastive_kd_loss(**inputs, alpha=2.0, kd_weight=0.7, ce_weight=0.3,
                                               return_components=True)
        with pytest.raises(RuntimeError, match="gradients through kd_loss and ce_loss separately"):
            torch.autograd.grad(out.kd_loss, student_params(inputs))
        out = fused_linear_contrastive_kd_loss(**inputs, alpha=2.0, kd_weight=0.7, ce_weight=0.3,
                                               return_components=True)
        # a combination proportional to `loss` is fine, as on the eager path
        grads = torch.autograd.grad(2 * out.loss + 0 * out.kd_loss, student_params(inputs))
    reference = fused_linear_contrastive_kd_loss_reference(**inputs, alpha=2.0, kd_weight=0.7, ce_weight=0.3,
                                                           compute_dtype=torch.float64)[0]
    for grad, ref in zip(grads, torch.autograd.grad(2 * reference, student_params(inputs))):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_items", [0, torch.tensor(0), torch.tensor(0.0)])
@pytest.mark.parametrize("custom", [False, True])
def test_num_items_zero_gives_a_zero_loss_and_zero_gradients(num_items, custom):
    """No item in the whole accumulated batch (e.g. every token of it is a prompt): 0, not NaN or an error."""
    student, teacher, negative, labels = logits_inputs(seed=3)
    inputs = fused_inputs(seed=3)
    options = dict(alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.3, num_items_in_batch=num_items)
    with eager_custom_ops(custom):
        loss = contrastive_kd_loss(student, teacher, negative, labels, **options)
        (grad,) = torch.autograd.grad(loss, student)
        fused = fused_linear_contrastive_kd_loss(**inputs, **options)
        fused_grads = torch.autograd.grad(fused, student_params(inputs))
    ref = contrastive_kd_loss_reference(student, teacher, negative, labels, compute_dtype=torch.float64, **options)[0]
    (ref_grad,) = torch.autograd.grad(ref, student)
    assert float(loss.detach()) == float(ref.detach()) == 0.0 and float(fused.detach()) == 0.0
    for g in (grad, ref_grad, *fused_grads):
        assert torch.count_nonzero(g) == 0 and torch.isfinite(g).all()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit deprecations inside inductor
def test_compiled_training_step_has_no_graph_break():
    """``torch.compile(fullgraph=True)`` of student forward + loss for each op (backward through the compiled
    graph), the fused one under bf16 autocast with a tensor num_items_in_batch and with a top-k teacher: same loss and
    gradients as eager."""
    torch.manual_seed(0)
    body, head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 37)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 16, generator=g)
    teacher_hidden, negative_hidden = torch.randn(2, 5, 24, generator=g), torch.randn(2, 5, 24, generator=g)
    teacher_weight, teacher_logits = torch.randn(41, 24, generator=g) * 0.5, torch.randn(2, 5, 41, generator=g)
    labels = torch.randint(0, 37, (2, 5), generator=g)
    labels[0, :2] = -100

    def fused_step(x, teacher_hidden, negative_hidden, labels, num_items):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = torch.tanh(body(x))
            return fused_linear_contrastive_kd_loss(
                hidden, head.weight, teacher_hidden, teacher_weight, negative_hidden, labels, student_bias=head.bias,
                alpha=2.0, temperature=2.0, kd_weight=0.7, ce_weight=0.3, num_items_in_batch=num_items)

    def logits_step(x, teacher_logits, labels):
        logits = head(torch.tanh(body(x)))
        return contrastive_kd_loss(logits, teacher_logits, None, labels, alpha=0.0, beta=0.5, ce_weight=0.3)

    def topk_step(x, indices, logprobs, labels):  # a sparse (offline) teacher in the fused op
        return fused_linear_contrastive_kd_loss(
            torch.tanh(body(x)), head.weight, None, None, labels=labels, student_bias=head.bias, temperature=2.0,
            beta=0.5, ce_weight=0.3, teacher_topk_indices=indices, teacher_topk_logprobs=logprobs)

    logprobs, indices = torch.log_softmax(teacher_logits[..., :37] / 2.0, dim=-1).topk(5, dim=-1)
    params = [*body.parameters(), *head.parameters()]
    for step, args in ((fused_step, (x, teacher_hidden, negative_hidden, labels, torch.tensor(9))),
                       (logits_step, (x, teacher_logits, labels)),
                       (topk_step, (x, indices, logprobs, labels))):
        eager = step(*args)
        eager_grads = torch.autograd.grad(eager, params)
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True)(*args)  # inductor; raises on a graph break
        compiled_grads = torch.autograd.grad(compiled, params)
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
        for got, want in zip(compiled_grads, eager_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_without_a_host_sync_bad_values_give_nan(monkeypatch):
    """The CUDA policy (simulated on the CPU): with ``check_finite=False`` and no labels nothing is read back from the
    device, and a negative per-row alpha or a negative num_items_in_batch give NaN instead of an error; a label out of
    range is still an error (labels are always read)."""
    from caad_kernels import contrastive_kd as logits_module
    from caad_kernels import fused_linear as fused_module
    from caad_kernels.validation import HostChecks

    def cuda_policy(device, check_finite, has_labels=False):
        return check_finite or has_labels

    for module in (logits_module, fused_module):
        monkeypatch.setattr(module, "host_sync_allowed", cuda_policy)
    reads = []
    original = HostChecks.read
    monkeypatch.setattr(HostChecks, "read", lambda self: (reads.append(bool(self)), original(self))[1])
    student, teacher, negative, labels = logits_inputs(seed=5)
    mask = labels != -100
    alpha = torch.ones(2, 5)
    alpha[0, 3] = -1.0
    options = dict(check_finite=False, reduction="none", mask=mask)
    per_row = contrastive_kd_loss(student, teacher, negative, alpha=alpha, **options)
    assert torch.isnan(per_row[0, 3]) and torch.isfinite(per_row[0, 0]) and per_row[0, 1] == 0
    assert torch.isnan(contrastive_kd_loss(student, teacher, negative, check_finite=False, mask=mask,
                                           num_items_in_batch=torch.tensor(-2.0)))
    inputs = dict(fused_inputs(seed=5), labels=None)
    fused = fused_linear_contrastive_kd_loss(**inputs, alpha=alpha, compact=False, **options)
    assert torch.isnan(fused[0, 3]) and torch.isfinite(fused[0, 0]) and fused[0, 1] == 0
    assert not any(reads)  # no host synchronisation at all
    bad_labels = labels.clone()
    bad_labels[1, 2] = 1000
    with pytest.raises(ValueError, match="labels must be in"):
        contrastive_kd_loss(student, teacher, negative, bad_labels, check_finite=False, ce_weight=0.3)
    with pytest.raises(ValueError, match="labels must be in"):
        fused_linear_contrastive_kd_loss(**dict(inputs, labels=bad_labels), compact=False, ce_weight=0.3)
