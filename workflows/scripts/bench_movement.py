"""Microbenchmark: row movement of one sparse layer, bf16, Llama-2-7B width (D = 4096), batch 1.

Keeps 40% of the 64-token blocks, chosen at random. One step = the movement of a sparse layer in token
mode, forward + backward: two sub-layers (attention, MLP), each "load kept rows -> RMSNorm -> update ->
add back into the residual stream". The layer body is replaced by a stand-in (update = 0.5 * normed
rows) so that only movement is timed. Paths:

  naive   the permutation the paper compares against: argsort so kept tokens come first, full-length
          gather, compute on the prefix, concatenate and inverse-permute back (full-length copies)
  torch   LeMo's torch path: index_select + RMSNorm (lemo.norm, saves its bf16 input) + scatter_add_rows
  triton  lemo.kernels.movement: fused load + RMSNorm, in-place add into the residual stream

Per (context, path) one CSV row: median forward+backward time over timed steps (CUDA events), peak
allocated memory above the inputs, bytes moved and achieved GB/s. Bytes moved are counted, not modelled
by hand: one extra step runs under a dispatch mode that adds, per aten op, the bytes of its tensor
inputs and outputs (indexing ops count only the rows they touch; views and allocations count nothing),
and the Triton kernels are wrapped to add the bytes they read and write. An OOM or other failure is
recorded as a row with `status`.

Usage: python workflows/scripts/bench_movement.py OUT.csv [CONTEXT ...]   (default 8192 .. 131072)
"""

import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from lemo.bench.provenance import provenance
from lemo.bench.results import write_rows
from lemo.kernels import movement as mv
from lemo.kernels.rows import scatter_add_rows
from lemo.norm import RMSNormFunction

D, BLOCK, KEEP, EPS, DTYPE, DEVICE = 4096, 64, 0.4, 1e-5, torch.bfloat16, "cuda"
WARMUP, STEPS = 3, 10
aten = torch.ops.aten


# --------------------------------------------------------------------------- the three paths
def step_naive(hidden, keep, index, weight):
    n = hidden.shape[0] * hidden.shape[1]
    k = index.numel()
    perm = torch.argsort((~keep).to(torch.int8), stable=True)  # kept tokens first, in original order
    inv = torch.argsort(perm)
    x = hidden.reshape(n, D)[perm]  # full-length permuted copy
    prefix, rest = x[:k], x[k:]
    for _ in range(2):  # attention, MLP
        prefix = prefix + 0.5 * RMSNormFunction.apply(prefix, weight, EPS)
    return torch.cat([prefix, rest])[inv].view(hidden.shape)  # full-length concat + inverse permutation


def step_torch(hidden, keep, index, weight):
    flat = hidden.reshape(-1, D)
    for _ in range(2):
        h = RMSNormFunction.apply(flat.index_select(0, index), weight, EPS)
        flat = scatter_add_rows(flat, index, 0.5 * h)
    return flat.view(hidden.shape)


def step_triton(hidden, keep, index, weight):
    base = mv.writable_residual(hidden)
    for _ in range(2):
        base = mv.add_rows_(base, index, 0.5 * mv.load_rms_norm(base, index, weight, EPS))
    return base


PATHS = {"naive": step_naive, "torch": step_torch, "triton": step_triton}


# --------------------------------------------------------------------------- bytes moved
def _nbytes(t):
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


_FREE = {
    aten.empty.memory_format,
    aten.empty_strided.default,
    aten.empty_like.default,
    aten.detach.default,
    aten.lift_fresh.default,
    aten.alias.default,
}  # allocations and aliases move nothing
_INDEX_READ = {aten.index_select.default, aten.index.Tensor}  # read the selected rows, write them


class ByteCounter(TorchDispatchMode):
    """Bytes read + written by every aten op (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if func in _FREE or func.is_view:
            return out
        tensors_in = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        tensors_out = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if func in _INDEX_READ:
            idx = sum(_nbytes(t) for t in tensors_in[1:] if not t.is_floating_point())
            self.bytes += 2 * sum(_nbytes(t) for t in tensors_out) + idx
        elif packet in (aten.index_add_, aten.index_add):
            self_, source = args[0], args[3]
            copy = 0 if packet is aten.index_add_ else 2 * _nbytes(self_)
            self.bytes += copy + 3 * _nbytes(source) + _nbytes(args[2])
        elif packet in (aten.index_put_, aten.index_put):
            values = args[2]
            copy = 0 if packet is aten.index_put_ else 2 * _nbytes(args[0])
            self.bytes += copy + 2 * _nbytes(values) + sum(_nbytes(i) for i in args[1] if i is not None)
        elif packet in (
            aten.zeros,
            aten.zero_,
            aten.fill_,
            aten.full,
            aten.ones,
            aten.zeros_like,
            aten.ones_like,
            aten.full_like,
            aten.new_zeros,
            aten.new_full,
            aten.new_ones,
        ):
            self.bytes += sum(_nbytes(t) for t in tensors_out)
        else:
            self.bytes += sum(_nbytes(t) for t in tensors_in) + sum(_nbytes(t) for t in tensors_out)
        return out


class CountingKernel:
    """Wraps a Triton kernel: `kernel[grid](*args)` adds the bytes `formula(*args)` to a counter."""

    def __init__(self, kernel, formula, counter):
        self.kernel, self.formula, self.counter = kernel, formula, counter

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.counter.bytes += self.formula(*args)
            with _disable_current_modes():  # a launch moves what the formula says, whatever aten ops it makes
                return launch(*args, **kwargs)

        return run


def _rows(k, d, *tensors):
    return k * d * sum(t.element_size() for t in tensors)


KERNEL_BYTES = {
    "_gather_rows_kernel": lambda src, idx, dst, k, d: _rows(k, d, src, dst) + _nbytes(idx),
    "_scatter_rows_kernel": lambda src, idx, dst, k, d: _rows(k, d, src, dst) + _nbytes(idx),
    "_add_rows_kernel": lambda base, idx, rows, k, d: _rows(k, d, base, base, rows) + _nbytes(idx),
    "_load_rms_norm_fwd_kernel": lambda x, idx, w, out, rstd, k, d, eps: (
        _rows(k, d, x, out) + _nbytes(w) + _nbytes(rstd) + _nbytes(idx)
    ),
    "_load_rms_norm_bwd_kernel": lambda g, y, w, rstd, idx, dx, k, d: (
        _rows(k, d, g, y, dx) + _nbytes(w) + _nbytes(rstd) + _nbytes(idx)
    ),
}


def count_bytes(fn, inputs, grad):
    counter = ByteCounter()
    originals = {name: getattr(mv, name) for name in KERNEL_BYTES}
    args = inputs()  # the per-step input clone is not part of the path
    try:
        for name, formula in KERNEL_BYTES.items():
            setattr(mv, name, CountingKernel(originals[name], formula, counter))
        with counter:
            out = fn(*args)
            torch.autograd.grad(out, [inputs.leaf], grad)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    finally:
        for name, kernel in originals.items():
            setattr(mv, name, kernel)
    return counter.bytes


# --------------------------------------------------------------------------- timing
class Inputs:
    """A fresh residual stream per step (a clone of the leaf: non-leaf, contiguous, writable in place;
    its backward passes the gradient through without a copy)."""

    def __init__(self, length, gen):
        self.leaf = torch.randn(1, length, D, device=DEVICE, dtype=DTYPE, generator=gen).requires_grad_()
        self.weight = (1 + 0.1 * torch.randn(D, device=DEVICE, generator=gen)).to(DTYPE)  # frozen, as under LoRA
        nb = -(-length // BLOCK)
        blocks = torch.randperm(nb, device=DEVICE, generator=gen)[: max(1, round(KEEP * nb))].sort().values
        self.keep = torch.zeros(nb * BLOCK, dtype=torch.bool, device=DEVICE)
        self.keep.view(nb, BLOCK)[blocks] = True
        self.keep = self.keep[:length]
        self.index = self.keep.nonzero().squeeze(1)

    def __call__(self):
        return self.leaf.clone(), self.keep, self.index, self.weight


def time_path(fn, inputs, grad):
    times = []
    for i in range(WARMUP + STEPS):
        args = inputs()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args)
        torch.autograd.grad(out, [inputs.leaf], grad)
        end.record()
        end.synchronize()
        del out, args
        if i >= WARMUP:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_memory(fn, inputs, grad):
    args = inputs()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn(*args)
    torch.autograd.grad(out, [inputs.leaf], grad)
    del out
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main(out_path, contexts):
    prov = provenance(torch.device("cuda"))
    keys = ("gpu", "driver", "cuda", "torch", "triton", "git_commit", "git_dirty", "timestamp")
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    t0 = time.time()
    for length in contexts:
        inputs = grad = None
        try:
            inputs = Inputs(length, gen)
            grad = torch.randn(1, length, D, device="cuda", dtype=DTYPE, generator=gen)
        except torch.cuda.OutOfMemoryError as e:
            rows.append(dict(kernel="movement", impl="inputs", context=length, status=f"oom: {str(e)[:80]}"))
            inputs = grad = None
            torch.cuda.empty_cache()
            continue
        kept = inputs.index.numel()
        for name, fn in PATHS.items():
            row = dict(kernel="movement", impl=name, context=length, kept=kept, d=D, dtype="bf16")
            try:
                row["ms"] = time_path(fn, inputs, grad)
                row["peak_extra_mib"] = peak_memory(fn, inputs, grad) / 2**20
                row["bytes_moved"] = count_bytes(fn, inputs, grad)
                row["gbps"] = row["bytes_moved"] / row["ms"] / 1e6
                row["status"] = "ok"
            except torch.cuda.OutOfMemoryError as e:
                row["status"] = f"oom: {str(e)[:80]}"
            except Exception as e:  # record and go on: one failing path must not lose the others
                row["status"] = f"error: {type(e).__name__}: {str(e)[:120]}"
            torch.cuda.empty_cache()
            row.update({k: prov.get(k) for k in keys})
            rows.append(row)
            print(
                f"{name:7s} L={length:7d} K={kept:7d}: {row.get('ms', float('nan')):8.3f} ms "
                f"+{row.get('peak_extra_mib', float('nan')):8.0f} MiB {row.get('gbps', float('nan')):7.0f} GB/s "
                f"[{row['status']}] ({time.time() - t0:.0f}s)",
                flush=True,
            )
        del inputs, grad
        torch.cuda.empty_cache()
    write_rows(out_path, rows)


if __name__ == "__main__":
    main(sys.argv[1], [int(x) for x in sys.argv[2:]] or [8192, 16384, 32768, 65536, 131072])
