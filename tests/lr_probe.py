"""Reading the lr the fused op computed, exactly.

With betas (0, 0), eps 0 and no weight decay, one AdamW step from zero moments on a
parameter at 0 with gradient 1 moves it to exactly -lr: the first moment becomes g,
the second g*g, both bias corrections are 1 - 0**t = 1, and the update is
-lr/1 * 1 / (sqrt(1)/1 + 0). Torch's AdamW computes the same, so this probe reads
the k-th step's lr bit for bit from the op, from FusedAdamW and from
torch.optim.AdamW alike."""

from __future__ import annotations

import torch

from noam_ext._hyper import NUM_HYPER_COLUMNS, table_row

PROBE_HYPER = dict(betas=(0.0, 0.0), eps=0.0, weight_decay=0.0)


def hyper_rows(rows) -> torch.Tensor:
    """The op's table for (base lr, schedule) rows, built as FusedAdamW builds it."""
    table = [table_row([base, 0.0, 0.0, 0.0, 0.0], False, schedule) for base, schedule in rows]
    return torch.tensor(table, dtype=torch.float64).reshape(len(rows), NUM_HYPER_COLUMNS)


def op_lrs(rows, steps, op=None, device="cpu", **op_kwargs) -> list[list[float]]:
    """For each k in steps, the lr of each (base lr, schedule) row in the step after k
    completed steps, as the op computes it (one call per k, one float64 tensor per row)."""
    op = op or torch.ops.noam_ext.fused_adamw_
    hyper = hyper_rows(rows)
    n = len(rows)
    out = []
    for k in steps:
        zeros = lambda: [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(n)]  # noqa: E731
        params, exp_avgs, exp_avg_sqs = zeros(), zeros(), zeros()
        grads = [torch.ones(1, dtype=torch.float64, device=device) for _ in range(n)]
        steps_t = [torch.zeros((), dtype=torch.float32, device=device) for _ in range(n)]
        counter = torch.tensor([k], dtype=torch.int64, device=device)
        op(params, grads, exp_avgs, exp_avg_sqs, [], steps_t, counter, hyper, list(range(n)), **op_kwargs)
        out.append(torch.cat(params).neg().tolist())   # -(-lr) is lr exactly; one read per call
    return out


def reset_for_probe(params) -> None:
    """Before a probed optimizer step: parameters at 0, gradient 1 (the moments need no
    reset: with betas (0, 0) each step overwrites them)."""
    with torch.no_grad():
        for p in params:
            p.zero_()
            p.grad = torch.ones_like(p)
