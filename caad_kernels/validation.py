"""Input checks that need the data: in-kernel row flags and the op's one host synchronisation.

Every row kernel reports, per row, what it found wrong while it read the row anyway (no separate
pass over the inputs), as bits of an int32 ``[rows]`` tensor (ignored rows are never read and
have 0):

=====  ===================================================================================
bit    meaning
=====  ===================================================================================
1      the student logits hold NaN or ``+inf``
2      the teacher (positive-path) logits hold NaN or ``+inf``
4      the negative-path logits hold NaN or ``+inf``, or ``-inf`` where the positive path is
       finite (``z_hat`` would be ``+inf``); only when the negative path is used
8      the label is outside ``[0, V)`` and is not ``ignore_index`` (only when CE is computed)
16     a top-k teacher row is malformed: an index outside ``[0, V)`` in a non-empty slot, a
       repeated index, or probabilities summing past 1 (:mod:`caad_kernels.topk`; with a
       top-k teacher, bit 2 means NaN or ``+inf`` log-probabilities)
=====  ===================================================================================

A flagged row gets a NaN loss and a NaN gradient on every backend (so a GradScaler skips the
step). The ops read the flags together with the other data-dependent checks (a tensor
``num_items_in_batch``, a per-row ``alpha``, the number of valid rows) in a single
``.tolist()``: labels out of range and malformed top-k rows always raise; non-finite logits raise
when ``check_finite``.

**When the flags are read.** On the CPU a host synchronisation costs nothing, so the flags are
always read (errors are raised whatever ``check_finite`` says). On CUDA they are read when
``check_finite=True``, when labels are given (a label out of range is always an error: a data
bug must not become a loss, issue 11) or when the fused op synchronises anyway to compact its
rows. Otherwise (CUDA, ``check_finite=False``, no labels, and for the fused op nothing to compact
or ``compact=False``) nothing waits for the device, and a bad value shows up as a NaN loss and
NaN gradients for its rows (a bad tensor ``num_items_in_batch`` or per-row ``alpha`` as a NaN
loss), which a ``GradScaler`` skips and a NaN check in the training loop catches. A device-side
assert (``torch._assert_async``) was not used: it kills the CUDA context, which issue 11 ruled out.
"""

from __future__ import annotations

import torch

FLAG_STUDENT = 1
FLAG_TEACHER = 2
FLAG_NEGATIVE = 4
FLAG_LABEL = 8
FLAG_TOPK = 16
FLAG_BITS = (FLAG_STUDENT, FLAG_TEACHER, FLAG_NEGATIVE, FLAG_LABEL)
TOPK_MESSAGE = ("teacher_topk_indices / teacher_topk_logprobs are malformed: a slot whose log-probability is not "
                "-inf has an index outside [0, {vocab}), an index is repeated within the row, or the "
                "probabilities sum to more than 1")


def host_sync_allowed(device: torch.device, check_finite: bool, has_labels: bool = False) -> bool:
    """Whether an op reads its flags back: always on the CPU (free); on CUDA with ``check_finite`` or labels."""
    return check_finite or has_labels or device.type != "cuda"


class HostChecks:
    """Device scalars gathered during a call and read back in one host synchronisation."""

    def __init__(self) -> None:
        self._names: list[str] = []
        self._values: list[torch.Tensor] = []

    def add(self, name: str, value: torch.Tensor) -> None:
        self._names.append(name)
        self._values.append(value.reshape(()).to(torch.float64))

    def add_first_row(self, name: str, condition: torch.Tensor) -> None:
        """The first index where the bool ``[rows]`` ``condition`` holds (``-1`` when nowhere)."""
        rows = condition.numel()
        if rows == 0:
            return
        index = torch.arange(rows, device=condition.device)
        first = torch.where(condition, index, rows).min()
        self.add(name, torch.where(first == rows, -1, first))

    def add_first_flagged_rows(self, flags: torch.Tensor, bits: tuple[int, ...] = FLAG_BITS) -> None:
        """For each flag bit in ``bits``, the first row that has it (``-1`` when none), named ``flag<bit>``."""
        for bit in bits:
            self.add_first_row(f"flag{bit}", (flags & bit) != 0)

    def __bool__(self) -> bool:
        return bool(self._names)

    def read(self) -> dict[str, float]:
        """The values by name: the call's one host synchronisation (none when nothing was added)."""
        if not self._names:
            return {}
        values = torch.stack([v.to(self._values[0].device) for v in self._values]).tolist()
        return dict(zip(self._names, values))


def check_host_values(
    values: dict[str, float],
    *,
    check_finite: bool,
    flag_names: dict[int, str],
    labels: torch.Tensor | None = None,
    row_index: torch.Tensor | None = None,
    vocab: int = 0,
    ignore_index: int = -100,
) -> None:
    """Raise a ValueError for what :class:`HostChecks` found, naming the argument.

    ``flag_names`` maps flag bits to what the message names (the argument, or for the fused op
    the arguments that make those logits). ``labels`` (flat) and ``row_index`` (the original row
    of each kernel row, after compaction) let the message quote the offending label.
    """
    num_items = values.get("num_items_in_batch")
    if num_items is not None and not (num_items >= 0 and num_items != float("inf")):
        raise ValueError(f"num_items_in_batch must be >= 0 and finite (0: a zero loss), got {num_items:g}")
    if values.get("alpha_bad", 0.0) > 0:
        raise ValueError("alpha as a tensor must hold finite values >= 0 (one per row), found negative or NaN/inf")
    label_row = int(values.get(f"flag{FLAG_LABEL}", -1))
    if label_row >= 0:
        original = label_row if row_index is None else int(row_index[label_row])
        value = "" if labels is None else f" {int(labels.reshape(-1)[original])}"
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}, found{value} at row {original} "
            "(of the flattened leading dimensions)"
        )
    topk_row = int(values.get(f"flag{FLAG_TOPK}", -1))
    if topk_row >= 0:
        original = topk_row if row_index is None else int(row_index[topk_row])
        raise ValueError(TOPK_MESSAGE.format(vocab=vocab) + f" (first at row {original} of the flattened leading "
                         "dimensions)")
    if not check_finite:
        return
    for bit in (FLAG_STUDENT, FLAG_TEACHER, FLAG_NEGATIVE):
        row = int(values.get(f"flag{bit}", -1))
        if row >= 0:
            original = row if row_index is None else int(row_index[row])
            raise ValueError(
                f"{flag_names[bit]} (first at row {original} of the flattened leading dimensions); pass "
                "check_finite=False to get a NaN loss and NaN gradients for such rows instead of this error"
            )
