"""Row movement between the full hidden state and the kept tokens, keeping only indices for backward.

`scatter_add_rows(base, index, rows)` = base.index_add(0, index, rows). PyTorch's own index_add
saves `rows` for its backward (K x D values per call, two calls per sparse layer); this Function
saves the index alone: d(base) = grad, d(rows) = grad[index].
"""

from __future__ import annotations

import torch


def scatter_add_rows_reference(base: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return base.index_add(0, index, rows)


class ScatterAddRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, index, rows):
        ctx.save_for_backward(index)
        ctx.rows_dtype = rows.dtype  # under autocast the rows are bf16 while the residual stream is fp32
        return base.index_add(0, index, rows.to(base.dtype))

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        grad_rows = grad.index_select(0, index).to(ctx.rows_dtype) if ctx.needs_input_grad[2] else None
        return (grad if ctx.needs_input_grad[0] else None), None, grad_rows


def scatter_add_rows(base: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(N, D) base + rows (K, D) added at `index` (K,), out of place; backward saves the index only."""
    return ScatterAddRows.apply(base, index, rows)
