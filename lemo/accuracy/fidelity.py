"""Fidelity diagnostics: how far a LeMo configuration moves a model's training signal, without training.

For held-out windows, each LeMo variant's *training* forward and backward are compared with the same
model's dense ones (PEFT LoRA on q,k,v,o at its initialisation, so both start from the same function):
- the training-forward loss (what the optimizer sees), overall and split by token fate: tokens kept in
  every sparse layer, tokens eliminated in the last sparse layer, and the rest;
- the cosine of the LoRA gradient with the dense LoRA gradient, overall and per layer (PEFT starts
  lora_B at zero, so this is the gradient of lora_B: the update of the first step);
- the attention mass that the kept blocks capture in each sparse layer (dense softmax of that layer's
  real queries and keys, over the layer's actual input in the LeMo forward), for kept queries and for
  all queries.
It is the cheap screen for every idea before a fine-tuning run confirms it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from ..apply import apply_lemo, lemo_state, remove_lemo
from ..bench.progress import progress
from ..config import LeMoConfig
from ..elimination import with_kept_rows
from ..models.adapters import get_adapter, unwrap
from ..scoring import project_qk

QUERY_CHUNK = 1024


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {
        n: p.grad.detach().float().flatten().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else float("nan")


def grad_cosines(grads: dict, ref: dict) -> tuple[float, dict[int, float]]:
    """Overall cosine and per-layer cosines (each layer's LoRA gradients concatenated)."""
    names = sorted(ref)
    overall = _cosine(torch.cat([grads[n] for n in names]), torch.cat([ref[n] for n in names]))
    layers: dict[int, tuple[list, list]] = {}
    for n in names:
        layer = _layer_of(n)
        if layer is not None:
            layers.setdefault(layer, ([], []))
            layers[layer][0].append(grads[n])
            layers[layer][1].append(ref[n])
    return overall, {i: _cosine(torch.cat(a), torch.cat(b)) for i, (a, b) in sorted(layers.items())}


def _token_nll(lm, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, L-1) next-token NLL from the final hidden states (after the final norm)."""
    head = lm.get_output_embeddings()
    out = []
    with torch.no_grad():
        for start in range(0, hidden.shape[1] - 1, 4096):
            end = min(start + 4096, hidden.shape[1] - 1)
            logits = head(hidden[:, start:end]).float()
            out.append(F.cross_entropy(logits.transpose(1, 2), ids[:, start + 1 : end + 1], reduction="none"))
    return torch.cat(out, dim=1)


def _train_step(model, ids: torch.Tensor, autocast: bool):
    """Loss, LoRA gradients, per-token NLL and the final hidden state's capture of one training step."""
    lm = unwrap(model)
    final_norm = get_adapter(lm.config.model_type).decoder(lm).norm
    captured = {}
    handle = final_norm.register_forward_hook(lambda m, a, out: captured.__setitem__("h", out.detach()))
    model.zero_grad(set_to_none=True)
    try:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            nll = _token_nll(lm, captured["h"], ids)
    finally:
        handle.remove()
    return loss.item(), _lora_grads(model), nll


@torch.no_grad()
def kept_attention_mass(parts, hidden: torch.Tensor, position_embeddings, keep: torch.Tensor) -> tuple[float, float]:
    """Mean softmax mass on kept keys, over (kept queries, all queries) and heads. hidden (1, L, D)."""
    q, k = project_qk(parts, hidden, position_embeddings)  # (1, Hq, L, hd), (1, Hkv, L, hd)
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1).float()
    q = q.float()
    length = q.shape[2]
    scale = parts.scaling * parts.q_prescale
    keep_k = keep.float()  # (L,)
    mass = torch.empty(length, device=q.device)
    pos = torch.arange(length, device=q.device)
    for start in range(0, length, QUERY_CHUNK):
        end = min(start + QUERY_CHUNK, length)
        scores = q[0, :, start:end] @ k[0, :, :end].transpose(-1, -2) * scale  # (H, c, end)
        scores.masked_fill_(pos[None, :end] > pos[start:end, None], float("-inf"))
        probs = scores.softmax(-1)
        mass[start:end] = (probs @ keep_k[:end]).mean(0)
    return float(mass[keep].mean()), float(mass.mean())


def _attention_masses(model, ids: torch.Tensor, autocast: bool) -> dict[int, tuple[float, float]]:
    """Per sparse layer: kept-block attention mass, from the LeMo forward's own layer inputs."""
    lm = unwrap(model)
    layers = get_adapter(lm.config.model_type).decoder(lm).layers
    inputs, handles = {}, []

    def record(layer, args, kwargs, i):
        hidden = args[0].detach()
        stream = layer.state.stream
        if layer.compact is not None and not layer.compact[0] and stream is not None:
            # inside a compact run the layer gets the kept rows only; the others are the run's input rows
            hidden = with_kept_rows(stream.full.detach(), layer.state.shared, hidden)
        inputs[i] = (hidden, kwargs.get("position_embeddings"))

    for i in lm._lemo.originals:
        handles.append(layers[i].register_forward_pre_hook(functools.partial(record, i=i), with_kwargs=True))
    try:
        with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            model(input_ids=ids, labels=ids)
    finally:
        for h in handles:
            h.remove()
    state = lemo_state(model)
    out = {}
    for i, (hidden, pe) in inputs.items():
        keep = torch.zeros(hidden.shape[1], dtype=torch.bool, device=hidden.device)
        keep[state.selections[i].index] = True
        parts = get_adapter(lm.config.model_type).parts(layers[i])
        out[i] = kept_attention_mass(parts, hidden, pe, keep)
    return out


def fate_masks(state, length: int) -> dict[str, torch.Tensor]:
    """(L,) bool masks for batch row 0: kept in every sparse layer / eliminated in the last / other."""
    kept_all = torch.ones(length, dtype=torch.bool)
    last = max(state.selections)
    elim_last = torch.ones(length, dtype=torch.bool)
    for i, sel in state.selections.items():
        k = torch.zeros(length, dtype=torch.bool)
        k[sel.index.cpu()[sel.index.cpu() < length]] = True
        kept_all &= k
        if i == last:
            elim_last = ~k
    return {"kept_all": kept_all, "eliminated_last": elim_last, "other": ~kept_all & ~elim_last}


def run_fidelity(
    model, windows: torch.Tensor, variants: dict[str, dict], autocast: bool = False, attention_mass: bool = True
) -> list[dict]:
    """Long-format rows (variant, window, metric, layer, value) for each LeMo variant against dense.

    `model` is a PEFT LoRA model in training mode; `windows` (W, L) token ids on the model's device.
    """
    rows = []
    for w, ids in progress(enumerate(windows), total=len(windows), desc="fidelity", unit="window"):
        ids = ids[None]
        dense_loss, dense_grads, dense_nll = _train_step(model, ids, autocast)
        rows.append(dict(variant="dense", window=w, metric="loss", layer=None, value=dense_loss))
        for name, options in variants.items():
            cfg = LeMoConfig.from_dict(options)
            apply_lemo(model, cfg)
            try:
                loss, grads, nll = _train_step(model, ids, autocast)
                state = lemo_state(model)
                length = ids.shape[1]
                overall, per_layer = grad_cosines(grads, dense_grads)
                rows.append(dict(variant=name, window=w, metric="loss", layer=None, value=loss))
                rows.append(
                    dict(
                        variant=name, window=w, metric="loss_delta_pct", layer=None, value=100 * (loss / dense_loss - 1)
                    )
                )
                rows.append(dict(variant=name, window=w, metric="grad_cos", layer=None, value=overall))
                rows += [
                    dict(variant=name, window=w, metric="grad_cos", layer=i, value=c) for i, c in per_layer.items()
                ]
                for fate, mask in fate_masks(state, length).items():
                    m = mask[:-1].to(nll.device)  # prediction positions
                    rows.append(
                        dict(variant=name, window=w, metric=f"share_{fate}", layer=None, value=float(m.float().mean()))
                    )
                    if m.any():
                        rows.append(
                            dict(
                                variant=name, window=w, metric=f"nll_{fate}", layer=None, value=float(nll[0, m].mean())
                            )
                        )
                        rows.append(
                            dict(
                                variant=name,
                                window=w,
                                metric=f"dense_nll_{fate}",
                                layer=None,
                                value=float(dense_nll[0, m].mean()),
                            )
                        )
                if attention_mass:
                    for i, (kq, allq) in _attention_masses(model, ids, autocast).items():
                        rows.append(dict(variant=name, window=w, metric="mass_kept_queries", layer=i, value=kq))
                        rows.append(dict(variant=name, window=w, metric="mass_all_queries", layer=i, value=allq))
            finally:
                remove_lemo(model)
    return rows


def summarize(rows: list[dict]):
    """One row per (variant, context): means over windows (and over layers for per-layer metrics)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    overall = df[df["layer"].isna()].groupby(["context", "variant", "metric"])["value"].mean().unstack("metric")
    layered = df[df["layer"].notna()].groupby(["context", "variant", "metric"])["value"].mean().unstack("metric")
    layered = layered.rename(columns={c: f"{c}_layer_mean" for c in layered.columns})
    table = overall.join(layered, how="left").reset_index()
    first = [
        "context",
        "variant",
        "loss",
        "loss_delta_pct",
        "grad_cos",
        "grad_cos_layer_mean",
        "mass_kept_queries_layer_mean",
        "mass_all_queries_layer_mean",
        "share_kept_all",
        "nll_kept_all",
        "dense_nll_kept_all",
        "share_eliminated_last",
        "nll_eliminated_last",
        "dense_nll_eliminated_last",
    ]
    cols = [c for c in first if c in table.columns] + [c for c in table.columns if c not in first]
    return table[cols]


def fidelity_experiment(
    model_dir: Path,
    corpus_dir: Path,
    out_csv: Path,
    variants: dict[str, dict],
    contexts: list[int],
    windows: int,
    rope_factor: float = 1.0,
    device: str = "cuda",
    seed: int = 0,
    attention_mass: bool = True,
    adapters: Path | None = None,
    merge: bool = False,
) -> list[dict]:
    """Load the checkpoint (RoPE scaled by rope_factor), add LoRA, run the diagnostics per context.

    merge: update an existing out_csv, replacing only these variants' rows (a screen of new variants
    keeps the committed ones; its own dense reference rows are dropped where the file has them)."""
    from lemo_baselines.lora import apply_lora

    from ..bench.provenance import provenance
    from .corpus import sample_windows
    from .finetune import load_extended

    dev = torch.device(device)
    autocast = dev.type == "cuda"
    model = load_extended(model_dir, rope_factor, dev, dtype=torch.float32)
    model = apply_lora(model)
    if adapters is not None:  # a fine-tuned run's trained parameters (finetune --save-trained)
        state = torch.load(adapters, map_location=dev)
        missing = set(state) - {n for n, _ in model.named_parameters()}
        if missing:
            raise ValueError(f"{adapters}: parameters not in the model: {sorted(missing)[:3]}")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in state:
                    p.copy_(state[n])
    model.train()
    prov = {k: v for k, v in provenance(dev).items() if not isinstance(v, (dict, list))}
    rows = []
    for context in contexts:
        ids = sample_windows(corpus_dir, "heldout", context, windows, seed).to(dev)
        for r in run_fidelity(model, ids, variants, autocast=autocast, attention_mass=attention_mass):
            rows.append({"context": context, "rope_factor": rope_factor, "model_dir": str(model_dir), **r, **prov})
    import pandas as pd

    out_csv.parent.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    if merge and out_csv.exists():
        table = merge_screen(pd.read_csv(out_csv), table)
    table.to_csv(out_csv, index=False)
    return rows


def merge_screen(old, new):
    """old's rows with new's variants replaced by new's rows; new's dense rows only at contexts old lacks."""
    import pandas as pd

    screened = set(new.variant) - {"dense"}
    old = old[~old.variant.isin(screened)]
    have_dense = set(old.context[old.variant == "dense"])
    return pd.concat([old, new[~((new.variant == "dense") & new.context.isin(have_dense))]], ignore_index=True)
