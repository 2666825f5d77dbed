"""Permutation-free row movement for sparse layers: selective load (+ RMSNorm), in-place residual add,
RoPE at original positions. Triton kernels, torch references and autograd Functions side by side.

A sparse layer reads the kept rows of the flat hidden state (N = B*L rows of D) and adds its updates
back at the same rows. Nothing is permuted and no full-length copy is made or saved:

* ``load_rms_norm(base, index, weight, eps)`` -> (K, D): gather + RMSNorm in one pass, the arithmetic
  of transformers' Llama RMSNorm, ``w * (x.float() * rstd).to(x.dtype)``. Backward saves the index, the
  per-row rstd (K fp32) and its own output, which the following projections (LoRA's lora_A) keep
  anyway, and recovers the normalised value as ``xhat = out / w`` (one rounding of the output's dtype,
  i.e. exact up to that rounding). Channels whose weight is zero/subnormal (or large enough to
  overflow) cannot be recovered that way: their normalised columns are saved (K x #such channels, fp32)
  and backward runs in torch; the check is cached per weight tensor and version (frozen weights:
  one host sync per weight ever; note that ``weight.data`` edits bypass the version counter). The
  gradient rows are scattered straight into a zero full-length gradient; no (K, D) gather copy of the
  input is saved (the torch path's RMSNorm keeps one per norm).
* ``add_rows_(base, index, rows)``: ``base[index] += rows`` in place (``ctx.mark_dirty``); backward
  saves the index only: d base = grad (passed through, no copy), d rows = grad[index].
* ``rope_rows(x, cos, sin, index, length)``: rotate-half RoPE of kept-token rows (T, H, hd) at their
  original positions, read from the full cos/sin tables (no gathered copy); backward saves the index
  and the tables, which the dense layers save anyway (same storage), so nothing new.
* ``load_rows(base, index)``: plain gather (norms that are not fused, e.g. OPT's LayerNorm).
* ``writable_residual(hidden)``: the tensor the in-place adds may write into (see there).

Indices are unique (the selection's), sorted or not. Every kernel is a plain row kernel: one program
per block of kept rows (rows of (T*H, hd) for RoPE), BLOCK_D = next power of two of D, fp32 arithmetic.
Needs CUDA tensors, or TRITON_INTERPRET=1 on CPU (set before this module is imported).
"""

from __future__ import annotations

import math

import torch

# Triton is optional: the torch path (LeMoConfig(movement_kernel="torch")) needs none of this.
from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import interpreter_on as _interpreter_on
from ._triton import tl, triton

__all__ = [
    "load_rms_norm",
    "load_rms_norm_reference",
    "load_rows",
    "load_rows_reference",
    "add_rows_",
    "add_rows_reference",
    "rope_rows",
    "rope_rows_reference",
    "load_norm",
    "fusable_rms_norm",
    "writable_residual",
]

# RMSNorm classes with exactly the arithmetic of the fused kernel: w * (x.float() * rstd).to(x.dtype).
FUSED_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


# --------------------------------------------------------------------------- Triton kernels
if _HAS_TRITON:

    @triton.jit
    def _row_block(pid, idx_ptr, K, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """Kept-row numbers k, their source rows idx[k] (int64), columns and the (BLOCK_R, BLOCK_D) mask."""
        k = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        kmask = k < K
        row = tl.load(idx_ptr + k, mask=kmask, other=0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = kmask[:, None] & (cols < D)[None, :]
        return k, row, cols, mask

    @triton.jit
    def _gather_rows_kernel(src_ptr, idx_ptr, dst_ptr, K, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        k, row, cols, mask = _row_block(tl.program_id(0), idx_ptr, K, D, BLOCK_R, BLOCK_D)
        x = tl.load(src_ptr + row[:, None] * D + cols[None, :], mask=mask)
        tl.store(dst_ptr + k[:, None] * D + cols[None, :], x.to(dst_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scatter_rows_kernel(src_ptr, idx_ptr, dst_ptr, K, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        k, row, cols, mask = _row_block(tl.program_id(0), idx_ptr, K, D, BLOCK_R, BLOCK_D)
        x = tl.load(src_ptr + k[:, None] * D + cols[None, :], mask=mask)
        tl.store(dst_ptr + row[:, None] * D + cols[None, :], x.to(dst_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_rows_kernel(base_ptr, idx_ptr, rows_ptr, K, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        # base[idx[k]] += rows[k]: fp32 add, one rounding to base's dtype (as index_add)
        k, row, cols, mask = _row_block(tl.program_id(0), idx_ptr, K, D, BLOCK_R, BLOCK_D)
        ptrs = base_ptr + row[:, None] * D + cols[None, :]
        acc = tl.load(ptrs, mask=mask).to(tl.float32)
        acc += tl.load(rows_ptr + k[:, None] * D + cols[None, :], mask=mask).to(tl.float32)
        tl.store(ptrs, acc.to(base_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_rms_norm_fwd_kernel(
        x_ptr, idx_ptr, w_ptr, out_ptr, rstd_ptr, K, D, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        k, row, cols, mask = _row_block(tl.program_id(0), idx_ptr, K, D, BLOCK_R, BLOCK_D)
        x = tl.load(x_ptr + row[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        xhat = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)  # .to(input_dtype) as transformers
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        tl.store(out_ptr + k[:, None] * D + cols[None, :], (w[None, :] * xhat).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + k, rstd, mask=k < K)

    @triton.jit
    def _load_rms_norm_bwd_kernel(
        g_ptr, y_ptr, w_ptr, rstd_ptr, idx_ptr, dx_ptr, K, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        # dx[idx[k]] = rstd * (gn - xhat * mean(gn * xhat)), xhat = y / w, gn = (g * w) in x's dtype
        k, row, cols, mask = _row_block(tl.program_id(0), idx_ptr, K, D, BLOCK_R, BLOCK_D)
        offs = k[:, None] * D + cols[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
        nonzero = w != 0.0
        xhat = tl.where(nonzero, y / tl.where(nonzero, w, 1.0), 0.0)
        gn = (g * w).to(dx_ptr.dtype.element_ty).to(tl.float32)  # autograd casts it to the input dtype
        rstd = tl.load(rstd_ptr + k, mask=k < K, other=0.0)
        dot = tl.sum(gn * xhat, axis=1) / D
        dx = rstd[:, None] * (gn - xhat * dot[:, None])
        tl.store(dx_ptr + row[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_rows_kernel(
        x_ptr,
        cos_ptr,
        sin_ptr,
        idx_ptr,
        out_ptr,
        R,
        L,
        H,
        HALF,
        sxt,
        sxh,
        sxd,
        scb,
        scl,
        scd,
        ssb,
        ssl,
        ssd,
        BLOCK_R: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        BACKWARD: tl.constexpr,
    ):
        # Rows r = t * H + h of x (T, H, hd), BLOCK_R per program; token t sits at flat position idx[t].
        # forward:  y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2   (x * cos + cat(-x2, x1) * sin)
        # backward: g1 = y1 c1 + y2 s2, g2 = y2 c2 - y1 s1   (its transpose)
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        rmask = r < R
        t = r // H
        h = r - t * H
        flat = tl.load(idx_ptr + t, mask=rmask, other=0).to(tl.int64)
        b = flat // L
        pos = flat - b * L
        j = tl.arange(0, BLOCK_HALF)
        m2 = rmask[:, None] & (j < HALF)[None, :]
        c_off = (b * scb + pos * scl)[:, None] + j[None, :] * scd
        s_off = (b * ssb + pos * ssl)[:, None] + j[None, :] * ssd
        c1 = tl.load(cos_ptr + c_off, mask=m2, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + c_off + HALF * scd, mask=m2, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + s_off, mask=m2, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + s_off + HALF * ssd, mask=m2, other=0.0).to(tl.float32)
        x_off = (t * sxt + h * sxh)[:, None] + j[None, :] * sxd
        x1 = tl.load(x_ptr + x_off, mask=m2, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + x_off + HALF * sxd, mask=m2, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        o_off = r[:, None] * (2 * HALF) + j[None, :]  # out is contiguous (T, H, 2 * HALF)
        tl.store(out_ptr + o_off, o1.to(out_ptr.dtype.element_ty), mask=m2)
        tl.store(out_ptr + o_off + HALF, o2.to(out_ptr.dtype.element_ty), mask=m2)


# --------------------------------------------------------------------------- launch helpers
def _require_triton(t: torch.Tensor) -> None:
    if not _HAS_TRITON or (not t.is_cuda and not _interpreter_on()):
        raise RuntimeError(
            "the Triton movement kernels need triton and CUDA tensors (or TRITON_INTERPRET=1 set "
            "before lemo is imported); use LeMoConfig(movement_kernel='torch')"
        )


def _launch_shape(rows: int, width: int) -> tuple[int, int, int, int]:
    """(grid, BLOCK_R, BLOCK_W, num_warps) for `rows` rows of `width` values.

    On the GPU a program takes about 4096 values (one row of D = 4096; several short rows), since one
    row is read once and each program's reduction is over its own row. The interpreter runs programs
    one after another in numpy, so it gets as many rows per program as fit in 2^16 values.
    """
    block_w = triton.next_power_of_2(max(int(width), 1))
    target = 2**16 if _interpreter_on() else 4096
    block_r = max(1, min(target // block_w, triton.next_power_of_2(max(int(rows), 1))))
    warps = 4 if block_r * block_w <= 2048 else 8 if block_r * block_w <= 8192 else 16
    return triton.cdiv(rows, block_r), block_r, block_w, warps


def _check_index(index: torch.Tensor, device) -> None:
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64) or index.device != device:
        raise ValueError(
            f"index must be a 1-D int32/int64 tensor on {device}; got {tuple(index.shape)} "
            f"{index.dtype} on {index.device}"
        )
    if index.numel() >= 2**31:
        raise ValueError(f"too many rows for one launch: {index.numel()}")


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(..., D) -> contiguous (N, D) (a view when already contiguous)."""
    return t.contiguous().view(-1, t.shape[-1])


def _gather(src2d: torch.Tensor, index: torch.Tensor, dtype=None) -> torch.Tensor:
    k, d = index.numel(), src2d.shape[1]
    out = torch.empty(k, d, dtype=dtype or src2d.dtype, device=src2d.device)
    if k and d:
        grid, br, bd, warps = _launch_shape(k, d)
        _gather_rows_kernel[(grid,)](src2d, index, out, k, d, BLOCK_R=br, BLOCK_D=bd, num_warps=warps)
    return out


def _scatter_into_zeros(rows: torch.Tensor, index: torch.Tensor, shape, dtype) -> torch.Tensor:
    out = torch.zeros(shape, dtype=dtype, device=rows.device)
    k, d = rows.shape
    if k and d:
        grid, br, bd, warps = _launch_shape(k, d)
        _scatter_rows_kernel[(grid,)](rows.contiguous(), index, out, k, d, BLOCK_R=br, BLOCK_D=bd, num_warps=warps)
    return out


# --------------------------------------------------------------------------- plain row load
def load_rows_reference(base: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return base.reshape(-1, base.shape[-1]).index_select(0, index)


class LoadRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, index):
        _require_triton(base)
        _check_index(index, base.device)
        ctx.save_for_backward(index)
        ctx.shape, ctx.dtype = base.shape, base.dtype
        return _gather(_flat(base), index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return _scatter_into_zeros(grad, index, ctx.shape, ctx.dtype), None


def load_rows(base: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of `base` (..., D) viewed as (N, D): (K, D). Backward saves the index only."""
    return LoadRows.apply(base, index)


# --------------------------------------------------------------------------- in-place residual add
def add_rows_reference(base: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Out of place: base (..., D) with rows (K, D) added at flat rows `index`."""
    return base.reshape(-1, base.shape[-1]).index_add(0, index, rows.to(base.dtype)).view(base.shape)


class AddRowsInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, index, rows):
        _require_triton(base)
        d = base.shape[-1]
        _check_index(index, base.device)
        if not base.is_contiguous():
            raise ValueError("add_rows_ writes in place: base must be contiguous")
        if rows.shape != (index.numel(), d):
            raise ValueError(f"rows must be (K, D) = ({index.numel()}, {d}); got {tuple(rows.shape)}")
        k = index.numel()
        if k and d:
            grid, br, bd, warps = _launch_shape(k, d)
            _add_rows_kernel[(grid,)](
                base, index, rows.to(base.dtype).contiguous(), k, d, BLOCK_R=br, BLOCK_D=bd, num_warps=warps
            )
        ctx.mark_dirty(base)
        ctx.save_for_backward(index)
        ctx.rows_dtype = rows.dtype
        return base

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        grad_rows = _gather(_flat(grad), index, ctx.rows_dtype) if ctx.needs_input_grad[2] else None
        return (grad if ctx.needs_input_grad[0] else None), None, grad_rows


def add_rows_(base: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """base[index] += rows in place (base (..., D) contiguous, viewed as (N, D); rows (K, D)); returns base.

    Backward saves the index only. Autograd's version counter turns any later use of a tensor saved
    before the add (base or a view of it) into an error; use `writable_residual` to decide whether the
    layer's input may be written at all.
    """
    return AddRowsInPlace.apply(base, index, rows)


def writable_residual(hidden: torch.Tensor) -> torch.Tensor:
    """`hidden` itself when the layer may add into it in place, else one contiguous clone.

    In place needs: grad mode on (reentrant checkpointing runs its forward under no_grad and keeps the
    input); no saved-tensors hooks active (non-reentrant checkpointing runs forward and recompute under
    its hooks and recomputes from the input, offloading hooks copy saved tensors where the version
    counter cannot see them); a contiguous tensor that is not a view (an in-place add through a view
    makes autograd's CopySlices clone the whole gradient in backward) and not a leaf requiring grad.
    Any remaining case where a saved tensor is written is an autograd version-counter error, never a
    silently wrong gradient. Tensors that are merely referenced elsewhere (e.g. hidden states recorded
    with output_hidden_states=True) see the update.
    """
    if _can_write_in_place(hidden):
        return hidden
    return hidden.clone(memory_format=torch.contiguous_format)


def _saved_tensors_hooks_active() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return True  # cannot tell: assume a checkpoint is running
    try:
        return top(False) is not None
    except Exception:
        return True


def _can_write_in_place(t: torch.Tensor) -> bool:
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled() or t.is_inference():
        return False
    if t._is_view() or not t.is_contiguous() or (t.is_leaf and t.requires_grad):
        return False
    return not _saved_tensors_hooks_active()


# --------------------------------------------------------------------------- fused load + RMSNorm
def load_rms_norm_reference(base: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, eps: float):
    """Transformers' Llama RMSNorm on the gathered rows (autograd keeps the gathered fp32 copy)."""
    x = base.reshape(-1, base.shape[-1]).index_select(0, index)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


_UNSAFE_CACHE = None


def _unsafe_channels(weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor | None:
    """Channels where out / w does not give back the normalised value (|w| below the smallest normal of
    the output dtype, non-finite, or large enough for w * xhat, |xhat| <= sqrt(D), to overflow); None if
    there are none. Cached per weight tensor and version: one host sync per weight and update."""
    global _UNSAFE_CACHE
    if _UNSAFE_CACHE is None:
        from torch.utils.weak import WeakTensorKeyDictionary

        _UNSAFE_CACHE = WeakTensorKeyDictionary()
    key = (weight._version, weight.data_ptr(), out_dtype)
    hit = _UNSAFE_CACHE.get(weight)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        info = torch.finfo(out_dtype)
        a = weight.detach().float().abs()
        bad = ~torch.isfinite(a) | (a < info.tiny) | (a * math.sqrt(weight.numel()) > info.max)
        cols = bad.nonzero().squeeze(1)
        cols = cols if cols.numel() else None
    _UNSAFE_CACHE[weight] = (key, cols)
    return cols


class LoadRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, index, weight, eps):
        _require_triton(base)
        d = base.shape[-1]
        if weight.shape != (d,):
            raise ValueError(f"weight must be ({d},); got {tuple(weight.shape)}")
        _check_index(index, base.device)
        x = _flat(base)
        k = index.numel()
        out = torch.empty(k, d, dtype=torch.promote_types(base.dtype, weight.dtype), device=base.device)
        rstd = torch.empty(k, dtype=torch.float32, device=base.device)
        w = weight.contiguous()
        if k and d:
            grid, br, bd, warps = _launch_shape(k, d)
            _load_rms_norm_fwd_kernel[(grid,)](
                x, index, w, out, rstd, k, d, float(eps), BLOCK_R=br, BLOCK_D=bd, num_warps=warps
            )
        cols = xcols = None
        if any(ctx.needs_input_grad) and k:
            cols = _unsafe_channels(weight, out.dtype)
            if cols is not None:  # their normalised columns, which out / w cannot give back
                xcols = x.index_select(0, index)[:, cols].float() * rstd[:, None]
        ctx.save_for_backward(index, rstd, out, weight, cols, xcols)
        ctx.shape, ctx.dtype = base.shape, base.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        index, rstd, out, weight, cols, xcols = ctx.saved_tensors
        k, d = out.shape
        grad_w = grad_x = None
        if k == 0:
            grad_x = torch.zeros(ctx.shape, dtype=ctx.dtype, device=out.device) if ctx.needs_input_grad[0] else None
            grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[2] else None
            return grad_x, None, grad_w, None
        grad_out = grad_out.contiguous()
        xhat = None
        if cols is not None or ctx.needs_input_grad[2]:
            wf = weight.float()
            xhat = torch.where(wf != 0, out.float() / torch.where(wf != 0, wf, 1.0), 0.0)
            if cols is not None:
                xhat[:, cols] = xcols
        if ctx.needs_input_grad[2]:
            grad_w = (grad_out * xhat.to(ctx.dtype)).float().sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            if cols is None:
                grad_x = torch.zeros(ctx.shape, dtype=ctx.dtype, device=out.device)
                grid, br, bd, warps = _launch_shape(k, d)
                _load_rms_norm_bwd_kernel[(grid,)](
                    grad_out,
                    out,
                    weight.contiguous(),
                    rstd,
                    index,
                    grad_x,
                    k,
                    d,
                    BLOCK_R=br,
                    BLOCK_D=bd,
                    num_warps=warps,
                )
            else:  # some weights are zero: torch, with the saved columns
                g = (grad_out * weight).to(ctx.dtype).float()
                rows = rstd[:, None] * (g - xhat * (g * xhat).mean(-1, keepdim=True))
                grad_x = _scatter_into_zeros(rows, index, ctx.shape, ctx.dtype)
        return grad_x, None, grad_w, None


def load_rms_norm(base: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of rows `index` of base (..., D) viewed as (N, D): (K, D) in promote(base, weight) dtype.

    Same arithmetic as transformers' Llama RMSNorm. Backward saves index, rstd (K fp32) and the output
    (shared with whoever consumes it) and scatters the input gradient into a zero (N, D) gradient.
    """
    return LoadRMSNorm.apply(base, index, weight, eps)


def fusable_rms_norm(norm) -> bool:
    return type(norm).__name__ in FUSED_NORMS and hasattr(norm, "variance_epsilon") and hasattr(norm, "weight")


def load_norm(norm, base: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """norm(base rows `index`): fused for Llama-family RMSNorm, a Triton gather + the module otherwise."""
    if fusable_rms_norm(norm):
        return load_rms_norm(base, index, norm.weight, norm.variance_epsilon)
    return norm(load_rows(base, index))


# --------------------------------------------------------------------------- RoPE at original positions
def _table_strides(table: torch.Tensor, length: int, hd: int):
    if table.dim() != 3 or table.shape[1] != length or table.shape[2] != hd:
        raise ValueError(f"cos/sin must be (B or 1, L={length}, hd={hd}); got {tuple(table.shape)}")
    sb, sl, sd = table.stride()
    return (0 if table.shape[0] == 1 else sb), sl, sd


def rope_rows_reference(x, cos, sin, index, length):
    """x (T, H, hd) rotated at flat positions `index` into (B, L): cos/sin gathered, then apply_rope."""
    from ..rope import apply_rope

    rows = int(index.max()) // length + 1 if index.numel() else 1
    hd = cos.shape[-1]
    c = cos.expand(max(rows, cos.shape[0]), length, hd).reshape(-1, hd).index_select(0, index)
    s = sin.expand(max(rows, sin.shape[0]), length, hd).reshape(-1, hd).index_select(0, index)
    return apply_rope(x, c[:, None, :], s[:, None, :])


def _launch_rope(x, cos, sin, index, length, out, backward: bool):
    t, h, hd = x.shape
    if not t or not h:
        return
    scb, scl, scd = _table_strides(cos, length, hd)
    ssb, ssl, ssd = _table_strides(sin, length, hd)
    half = hd // 2
    grid, br, bh, warps = _launch_shape(t * h, half)
    _rope_rows_kernel[(grid,)](
        x,
        cos,
        sin,
        index,
        out,
        t * h,
        length,
        h,
        half,
        *x.stride(),
        scb,
        scl,
        scd,
        ssb,
        ssl,
        ssd,
        BLOCK_R=br,
        BLOCK_HALF=bh,
        BACKWARD=backward,
        num_warps=warps,
    )


class RopeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, index, length):
        _require_triton(x)
        if x.dim() != 3 or x.shape[-1] % 2 or x.shape[0] != index.numel():
            raise ValueError(f"x must be (T={index.numel()}, H, even hd); got {tuple(x.shape)}")
        _check_index(index, x.device)
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
        _launch_rope(x, cos, sin, index, length, out, backward=False)
        ctx.save_for_backward(cos, sin, index)
        ctx.length, ctx.dtype = length, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin, index = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        grad_x = torch.empty(grad.shape, dtype=ctx.dtype, device=grad.device)
        _launch_rope(grad, cos, sin, index, ctx.length, grad_x, backward=True)
        return grad_x, None, None, None, None


def rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, index: torch.Tensor, length: int):
    """Rotate-half RoPE of x (T, H, hd) at flat positions `index` (b * length + l) into the (B or 1, L, hd)
    cos/sin tables; fp32 arithmetic, one rounding. Backward saves the index and the tables only."""
    return RopeRows.apply(x, cos, sin, index, length)
