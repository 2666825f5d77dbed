"""Microbenchmark: predictor scoring vs oracle scoring for all sparse layers, llama2-7b shapes, bf16, CUDA.

Only one decoder layer is built (random weights, llama2-7b config with the context's RoPE scaling); its
input is a random hidden state, scored once per sparse layer (16 of 32) by the oracle (Triton block
scores on the layer's real q, k) and by untrained predictors (LeMo's default sizes and a smaller
variant); cost does not depend on training. Per (context, scorer): median time of one all-layer pass
(CUDA events, warmup), peak memory above the inputs, and the predictors' parameter bytes.
Usage: python workflows/scripts/bench_predictors.py OUT.csv [CONTEXT ...]
"""

import statistics
import sys

import torch

from lemo.bench.provenance import provenance
from lemo.bench.results import write_rows
from lemo.config import LeMoConfig
from lemo.layout import TokenLayout
from lemo.models.adapters import get_adapter
from lemo.models.registry import get_spec, make_config
from lemo.predictors import LayerPredictor, PredictorScorer, PredictorSet
from lemo.scoring import OracleScorer

WIDTHS = [(128, 64), (64, 32)]
BLOCK = 64


def _layer(context):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = make_config(get_spec("llama2-7b"), context)
    torch.manual_seed(0)
    with torch.device("cuda"):
        layer = LlamaDecoderLayer(cfg, layer_idx=0).to(torch.bfloat16).eval()
        rope = LlamaRotaryEmbedding(cfg)
    return cfg, layer, rope


def _time(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_extra_mib(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main(out, contexts):
    prov = provenance(torch.device("cuda"))
    rows = []
    for length in contexts:
        cfg, layer, rope = _layer(length)
        sparse = LeMoConfig().resolve_sparse_layers(cfg.num_hidden_layers)
        parts = get_adapter("llama").parts(layer)
        hidden = torch.randn(1, length, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
        position_embeddings = rope(hidden, torch.arange(length, device="cuda")[None])
        layout = TokenLayout(torch.zeros(1, length, dtype=torch.int32, device="cuda"))
        scorers = [("oracle", None, OracleScorer("auto"), 0, 0)]
        for widths in WIDTHS:
            preds = PredictorSet(
                {
                    i: LayerPredictor(
                        parts.num_heads, parts.head_dim, cfg.hidden_size // parts.num_heads, BLOCK, widths
                    )
                    for i in sparse
                },
                {"block_size": BLOCK},
            )
            preds.to(device="cuda", dtype=torch.bfloat16)
            scorers.append(
                ("predictor", widths, PredictorScorer(preds), preds.parameter_count(), preds.parameter_bytes())
            )
        for name, widths, scorer, n_params, n_bytes in scorers:

            def run():
                for i in sparse:
                    # hidden and position_embeddings are bound above (deleted only after the loop)
                    scorer(parts, hidden, position_embeddings, layout, BLOCK, **({"layer": i} if widths else {}))  # noqa: F821

            with torch.no_grad():
                reps = 5 if name == "oracle" else 10
                ms = _time(run, warmup=2, reps=reps)
                extra = _peak_extra_mib(run)
            rows.append(
                dict(
                    bench="predictor_scoring",
                    model="llama2-7b",
                    context=length,
                    scorer=name,
                    widths="" if widths is None else f"{widths[0]},{widths[1]}",
                    layers=len(sparse),
                    block_size=BLOCK,
                    ms=ms,
                    ms_per_layer=ms / len(sparse),
                    peak_extra_mib=extra,
                    predictor_params=n_params,
                    predictor_bytes=n_bytes,
                    dtype="bfloat16",
                    **prov,
                )
            )
            print(
                f"L={length:6d} {name:9s} {rows[-1]['widths']:7s}: {ms:9.2f} ms ({ms / len(sparse):7.2f}/layer) "
                f"+{extra:7.0f} MiB  params {n_params}",
                flush=True,
            )
        del layer, rope, hidden, position_embeddings, scorers
        torch.cuda.empty_cache()
    write_rows(out, rows)


if __name__ == "__main__":
    main(sys.argv[1], [int(x) for x in sys.argv[2:]] or [8192, 16384, 32768, 65536])
