"""The LoRA baseline: PEFT LoRA on the attention projections (the paper: r=8, alpha=16 on q,k,v,o)."""

from __future__ import annotations

from dataclasses import dataclass

# Attention projection names per model family; "o" is out_proj in OPT.
TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),
}


@dataclass
class LoraOptions:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0  # the paper's setting; nonzero adds a saved mask per projection
    targets: str = "qkvo"  # letters of q,k,v,o to adapt
    # "float32": PEFT's default (adapters upcast; each adapted projection then saves an fp32 copy of
    # its input, 4 bytes per hidden value); "model": adapters in the model dtype (bf16).
    adapter_dtype: str = "float32"

    def __post_init__(self):
        if self.adapter_dtype not in ("float32", "model"):
            raise ValueError(f"adapter_dtype must be 'float32' or 'model', got {self.adapter_dtype!r}")

    def target_modules(self, model_type: str) -> list[str]:
        names = TARGETS.get(model_type)
        if names is None:
            raise ValueError(f"no LoRA target table for model_type {model_type!r}; known: {', '.join(TARGETS)}")
        chosen = [n for letter, n in zip("qkvo", names) if letter in self.targets]
        if not chosen or set(self.targets) - set("qkvo"):
            raise ValueError(f"targets must be letters of 'qkvo', got {self.targets!r}")
        return chosen


def apply_lora(model, options: LoraOptions | None = None):
    """Wrap `model` with PEFT LoRA; base weights frozen, adapters trainable. Returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    options = options or LoraOptions()
    config = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules(model.config.model_type),
        bias="none",
        task_type="CAUSAL_LM",
    )
    if options.adapter_dtype == "model" and not model.dtype.is_floating_point:
        raise ValueError(f"adapter_dtype='model' needs a floating-point model, got {model.dtype}")
    return get_peft_model(model, config, autocast_adapter_dtype=options.adapter_dtype == "float32")


def setup(model, options: dict):
    """Method entry point shared by every method: (model, options) -> model ready to train."""
    return apply_lora(model, LoraOptions(**options.get("lora", {})))
