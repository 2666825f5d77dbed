"""In-place cross-entropy gradient over a logits segment, and a fused LM head + cross-entropy.

Semantics (Hugging Face causal-LM loss, as ``lemo.segment_loss``): logits are produced in the model
dtype (bf16/fp32) by ``h @ W^T (+ b)``, upcast to fp32, and the loss is the mean over labelled
positions (target != -100) of ``logsumexp(z) - z[target]``.

Math, for one row z (V,) with target t and a scale s (= 1 / number of labelled rows):

    m   = max_j z_j,  lse = m + log sum_j exp(z_j - m)        (fp32, online over blocks of V)
    loss = lse - z_t
    grad_j = (exp(z_j - lse) - [j == t]) * s                 (= s * d loss / d z_j)

A row whose target is ``ignore_index`` has loss 0 and gradient 0.

Three pieces:

* ``cross_entropy_grad_reference`` -- plain torch (tests): returns loss, lse, gradient.
* ``cross_entropy_grad_``          -- Triton: one program per row, reads the row once for the running
  max / sum (online softmax) and once more for the gradient, which overwrites the logits buffer in
  place in its own dtype. No fp32 copy of the logits is ever made.
* ``FusedLinearCrossEntropy``      -- autograd Function (the Liger design): the forward knows the
  number of labelled rows first, so for each segment it computes the logits (one cuBLAS matmul into a
  reused buffer), turns them into the scaled gradient in place, and immediately projects it to the
  gradient of the hidden state (and accumulates fp32 gradients of the head weight / bias when they
  train). The backward only multiplies the stored gradients by ``grad_loss``. Compared with
  ``lemo.segment_loss.SegmentedCrossEntropy`` this saves the logits recompute matmul and the fp32
  logits / softmax temporaries; it keeps grad_hidden (N, D) from forward to backward instead of hidden.
"""

from __future__ import annotations

import torch

from ..segment_loss import IGNORE_INDEX  # noqa: E402  (one definition; segment_loss imports this module lazily)

# Triton is optional: the torch path (lemo.segment_loss) is the fallback.
from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import interpreter_on as _interpreter_on
from ._triton import tl, triton

__all__ = [
    "FusedLinearCrossEntropy",
    "cross_entropy_grad_",
    "cross_entropy_grad_reference",
    "fused_linear_cross_entropy",
    "triton_available",
]


# --------------------------------------------------------------------------- torch reference
def cross_entropy_grad_reference(logits, targets, scale, ignore_index=IGNORE_INDEX):
    """Plain torch: (loss (n,) fp32, lse (n,) fp32, grad (n, V) in logits.dtype). Does not modify logits."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, torch.zeros_like(targets)).long()
    loss = torch.where(valid, lse - z.gather(1, safe_t[:, None])[:, 0], torch.zeros_like(lse))
    grad = torch.exp(z - lse[:, None])
    grad[torch.arange(len(z), device=z.device), safe_t] -= 1.0
    grad = grad * (valid[:, None].float() * torch.as_tensor(scale, dtype=torch.float32, device=z.device))
    lse = torch.where(valid, lse, torch.zeros_like(lse))
    return loss, lse, grad.to(logits.dtype)


# --------------------------------------------------------------------------- Triton kernel
if _HAS_TRITON:

    @triton.jit
    def _ce_grad_kernel(
        x_ptr,
        stride_x,  # logits (n, V), overwritten with the gradient; unit stride along V
        tgt_ptr,
        loss_ptr,
        lse_ptr,
        scale_ptr,
        n_cols,
        ignore_index,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        tgt = tl.load(tgt_ptr + row).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        if tgt == ignore_index:
            zero = tl.zeros([BLOCK], dtype=x_ptr.dtype.element_ty)
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                tl.store(x_row + cols, zero, mask=cols < n_cols)
            tl.store(loss_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
        else:
            # pass 1: running max and rescaled sum of exponentials (one read of the row)
            m = float("-inf")
            s = 0.0
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, axis=0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
                m = m_new
            lse = m + tl.log(s)
            z_t = tl.load(x_row + tgt).to(tl.float32)  # before pass 2 overwrites it
            scale = tl.load(scale_ptr).to(tl.float32)
            # pass 2: gradient in place, in the buffer's dtype (second read, one write)
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                inside = cols < n_cols
                x = tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) * scale
                g = tl.where(cols == tgt, g - scale, g)
                tl.store(x_row + cols, g.to(x_ptr.dtype.element_ty), mask=inside)
            tl.store(loss_ptr + row, lse - z_t)
            tl.store(lse_ptr + row, lse)


def triton_available(device: torch.device | str) -> bool:
    """True when the Triton kernel can run on tensors of `device` (CUDA, or CPU in the interpreter)."""
    return _HAS_TRITON and (torch.device(device).type == "cuda" or _interpreter_on())


def _require_triton(device):
    if not triton_available(device):
        why = "triton is not installed" if not _HAS_TRITON else f"tensors are on {device}, not CUDA"
        raise RuntimeError(
            f"the Triton cross-entropy kernel cannot run here ({why}; TRITON_INTERPRET=1 runs it "
            "on CPU); use loss_kernel='torch'"
        )


def _launch_config(n_cols, dtype):
    block = min(4096 if dtype == torch.float32 else 8192, triton.next_power_of_2(max(n_cols, 16)))
    num_warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    return block, num_warps


def cross_entropy_grad_(logits, targets, scale, ignore_index=IGNORE_INDEX, loss_out=None, lse_out=None, block=None):
    """Triton: per-row fp32 loss and logsumexp; `logits` (n, V) is overwritten with the scaled gradient.

    `scale` is a float or a 0-d tensor on the logits' device (read by the kernel: no host sync).
    `targets` (n,) integer; rows equal to `ignore_index` get loss 0 and gradient 0. Targets must lie in
    [0, V) otherwise (not checked here: see FusedLinearCrossEntropy). Returns (loss (n,), lse (n,)).
    """
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(
            f"logits must be 2-D with unit stride along the vocabulary; got shape "
            f"{tuple(logits.shape)}, strides {logits.stride()}"
        )
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits dtype {logits.dtype} not supported (fp32, bf16, fp16)")
    n, v = logits.shape
    if tuple(targets.shape) != (n,):
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match logits rows ({n},)")
    _require_triton(logits.device)
    dev = logits.device
    loss = torch.empty(n, dtype=torch.float32, device=dev) if loss_out is None else loss_out
    lse = torch.empty(n, dtype=torch.float32, device=dev) if lse_out is None else lse_out
    if not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), dtype=torch.float32, device=dev)
    if n == 0:
        return loss, lse
    blk, num_warps = _launch_config(v, logits.dtype)
    if block is not None:
        blk = block
    _ce_grad_kernel[(n,)](
        logits,
        logits.stride(0),
        targets.contiguous(),
        loss,
        lse,
        scale.reshape(()),
        v,
        ignore_index,
        BLOCK=blk,
        num_warps=num_warps,
    )
    return loss, lse


# --------------------------------------------------------------------------- fused head + CE
def _accumulate_fp32(acc, a, b):
    """acc (fp32) += a @ b, with a, b in the model dtype: fp32 accumulation, no fp32 copy of a or b."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:  # torch >= 2.8: cuBLAS bf16/fp16 inputs with an fp32 output
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):
            pass
    acc += torch.mm(a, b).float()


class FusedLinearCrossEntropy(torch.autograd.Function):
    """loss = mean over labelled rows of CE(hidden @ weight^T + bias, targets), gradients made in forward.

    hidden (N, D), weight (V, D), bias (V,) or None, targets (N,) with -100 for unlabelled rows;
    hidden, weight and bias in one dtype (fp32/bf16/fp16). Logits exist for `segment` rows at a time.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, segment: int):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, d = hidden.shape
        v = weight.shape[0]
        dev = hidden.device
        valid = targets != IGNORE_INDEX
        # One host sync: an out-of-range target would make the kernel read outside its row.
        if bool(((targets < 0) & valid).any() | (targets >= v).any()):
            bad = targets[((targets < 0) & valid) | (targets >= v)][:5].tolist()
            raise ValueError(f"targets out of range [0, {v}) (or {IGNORE_INDEX} to ignore): {bad}")
        count = valid.sum().clamp(min=1).float()
        inv_count = 1.0 / count  # stays on the device; the kernel reads it
        loss_rows = torch.empty(n, dtype=torch.float32, device=dev)
        lse_rows = torch.empty(n, dtype=torch.float32, device=dev)
        grad_h = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_h else None
        grad_w = torch.zeros(v, d, dtype=torch.float32, device=dev) if need_w else None
        grad_b = torch.zeros(v, dtype=torch.float32, device=dev) if need_b else None
        buf = torch.empty(min(segment, n), v, dtype=hidden.dtype, device=dev)
        w_t = weight.t()
        for start in range(0, n, segment):
            stop = min(start + segment, n)
            h = hidden[start:stop]
            z = buf[: stop - start]
            if bias is None:
                torch.mm(h, w_t, out=z)
            else:
                torch.addmm(bias, h, w_t, out=z)
            cross_entropy_grad_(
                z, targets[start:stop], inv_count, loss_out=loss_rows[start:stop], lse_out=lse_rows[start:stop]
            )
            # z now holds d loss / d logits (model dtype), as the plain path's backward of .float()
            if need_h:
                torch.mm(z, weight, out=grad_h[start:stop])
            if need_w:
                _accumulate_fp32(grad_w, z.t(), h)
            if need_b:
                grad_b += z.sum(0, dtype=torch.float32)
        del buf
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return loss_rows.sum() / valid.sum()  # NaN when no row is labelled, as Hugging Face's loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        unit = bool(torch.equal(grad_loss, torch.ones_like(grad_loss)))  # the usual case: no rescaling pass
        if grad_h is not None and not unit:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w if unit else grad_w * grad_loss).to(w_dtype)
        if grad_b is not None:
            grad_b = (grad_b if unit else grad_b * grad_loss).to(b_dtype)
        return grad_h, grad_w, grad_b, None, None


def fused_linear_cross_entropy(hidden, weight, bias, targets, segment: int = 4096):
    """Mean cross-entropy of `hidden @ weight^T + bias` against `targets` (N,), via FusedLinearCrossEntropy."""
    if segment < 1:
        raise ValueError(f"segment must be >= 1 token, got {segment}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, D) and weight (V, D) expected; got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if tuple(targets.shape) != (hidden.shape[0],):
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match hidden rows ({hidden.shape[0]},)")
    dtypes = {hidden.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1:
        raise ValueError(
            f"hidden, weight and bias must share one dtype for the fused loss; got {sorted(map(str, dtypes))}"
        )
    _require_triton(hidden.device)
    return FusedLinearCrossEntropy.apply(hidden, weight, bias, targets.to(hidden.device), segment)
