"""Measurement of training steps: time, tokens/s, memory (allocator and NVML), saved activation bytes.

One step = forward, backward, optimizer step on the trainable (LoRA) parameters. Warm-up steps run
first; then the median of the timed steps (device-synchronised clocks) is reported. Memory is the
allocator's peak allocated and peak reserved over the timed steps, plus the NVML device-memory peak
sampled by a background thread while they run (absent without NVML). Saved activation bytes are
counted by a saved-tensors hook during one extra forward: unique storages, parameters excluded.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class SavedBytes:
    """Bytes of activations autograd keeps for backward (unique storages, no parameters)."""

    total: int = 0
    by_dtype: dict = field(default_factory=dict)
    by_module: dict = field(default_factory=dict)  # name -> bytes first saved while it ran (deduplicated per module)


@contextmanager
def count_saved_bytes(model: torch.nn.Module | None = None, modules: dict | None = None):
    """Count the unique storages saved for backward inside the block (parameters excluded).

    `modules` ({name: module}) also attributes bytes to whichever of them is running, deduplicated
    within each module (a storage two modules save counts for both). Tensors saved inside
    non-reentrant checkpoint regions are dropped by the checkpoint and not counted (they are
    recomputed); the inputs the checkpoint keeps pass through this hook and are counted.
    """
    result = SavedBytes()
    params = set()
    if model is not None:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen, seen_in = set(), {}
    running: list[str] = []

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if ptr in params or size == 0:
            return t.detach()
        if (ptr, t.device) not in seen:
            seen.add((ptr, t.device))
            result.total += size
            name = str(t.dtype).replace("torch.", "")
            result.by_dtype[name] = result.by_dtype.get(name, 0) + size
        if running and (ptr, t.device) not in seen_in.setdefault(running[-1], set()):
            seen_in[running[-1]].add((ptr, t.device))
            result.by_module[running[-1]] = result.by_module.get(running[-1], 0) + size
        # A detached alias: returning `t` itself would let a saved output hold its own grad_fn, a
        # reference cycle through C++ that keeps the whole graph alive after the loss is dropped.
        return t.detach()

    def enter(name):
        def hook(module, args):
            running.append(name)

        return hook

    def leave(module, args, output):  # must return None: a forward hook's return value replaces the output
        running.pop()

    handles = []
    for name, module in (modules or {}).items():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield result
    finally:
        for h in handles:
            h.remove()


class NvmlPeak:
    """Background sampler of the device's used memory (NVML); `.peak` in bytes, None without NVML."""

    def __init__(self, device_index: int = 0, interval_s: float = 0.002, enabled: bool = True):
        self.peak = None
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = None
        self._nvml = None
        if not enabled:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception:  # no NVML (CPU machine, or driver without it)
            self._nvml = None

    def used(self) -> int | None:
        """Device memory in use now (bytes), None without NVML."""
        return None if self._nvml is None else self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used

    def _run(self):
        while not self._stop.is_set():
            used = self.used()
            self.peak = used if self.peak is None else max(self.peak, used)
            time.sleep(self._interval)

    def __enter__(self):
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak or 0, self.used())


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def offloading(on: bool, device: torch.device):
    """Tensors saved for backward go to host memory (pinned, for a CUDA `device`) during the forward when `on`.

    Under non-reentrant checkpointing the saved tensors are mostly the checkpointed layers' inputs
    (torch saves them through the same hooks), so offloading moves the per-layer residual stream off
    the GPU; what is saved outside the layers (final norm, loss) moves too. Recomputation in backward
    runs outside this context and stays on the GPU.
    """
    if not on:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


def train_step(model, batch: dict, optimizer, offload: bool = False) -> float:
    with offloading(offload, batch["input_ids"].device):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


@dataclass
class StepStats:
    step_s: list
    loss: float
    tokens: int
    peak_allocated: int | None
    peak_reserved: int | None
    nvml_peak_used: int | None
    nvml_baseline_used: int | None

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.median_s


def time_steps(model, batch: dict, optimizer, warmup: int, steps: int, offload: bool = False) -> StepStats:
    """Warm up, then time `steps` training steps; memory peaks cover the timed steps only."""
    device = batch["input_ids"].device
    for _ in range(warmup):
        train_step(model, batch, optimizer, offload)
    _sync(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    sampler = NvmlPeak(device.index or 0, enabled=cuda)
    baseline = sampler.used()
    times, loss = [], float("nan")
    with sampler:
        for _ in range(steps):
            _sync(device)
            start = time.perf_counter()
            loss = train_step(model, batch, optimizer, offload)
            _sync(device)
            times.append(time.perf_counter() - start)
    return StepStats(
        step_s=times,
        loss=loss,
        tokens=int(batch["input_ids"].numel()),
        peak_allocated=torch.cuda.max_memory_allocated(device) if cuda else None,
        peak_reserved=torch.cuda.max_memory_reserved(device) if cuda else None,
        nvml_peak_used=sampler.peak,
        nvml_baseline_used=baseline,
    )


def saved_activation_bytes(model, batch: dict) -> SavedBytes:
    """Saved-for-backward bytes of one forward (graph freed afterwards without a backward)."""
    with count_saved_bytes(model) as saved:
        loss = model(**batch).loss
    del loss
    return saved
