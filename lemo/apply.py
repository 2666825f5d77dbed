"""`apply_lemo` / `remove_lemo`: put LeMo into a Hugging Face causal LM and take it out again.

Each sparse decoder layer is replaced by a `LeMoLayer` that adopts the original layer's children
(so parameter names, PEFT targets and state dicts are unchanged) and runs the original layer when
LeMo is inactive (evaluation). Selection is computed before gradient checkpointing wraps the sparse
computation, so recomputation never re-scores. A forward pre-hook on the decoder captures the padding
mask and position ids; the causal LM's forward is wrapped for the segmented loss. PEFT LoRA may be
applied before or after; `remove_lemo` restores every layer, MLP and forward it touched. A training
forward shorter than LeMoConfig.min_sparse_tokens runs as without LeMo: the LeMo layers run their
original layer, every forward LeMo patched the one it replaced (DenseFallback), the loss wrapper the
forward it wrapped.

With Liger-Kernel (lemo_baselines.liger) the order is LoRA -> Liger -> LeMo: Liger binds its RMSNorm,
SwiGLU and FLCE forwards on the instances (and its RoPE in the Llama module, used by the dense layers'
attention); LeMo then replaces the norm and MLP forwards it has its own version of (efficient_norm,
channel MLP) and wraps the LM forward for the segmented loss; `remove_lemo` puts Liger's forwards
back, so `remove_liger` runs after it. Where LeMo does not patch, Liger's kernels run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import LeMoConfig
from .elimination import Frozen, compact_layer, kept_rope, sparse_layer
from .layout import TokenLayout, make_layout
from .lora_norm import patch_lora_a
from .mlp import channel_pruned_forward
from .models.adapters import Adapter, get_adapter, unwrap
from .norm import is_rms_norm, rms_norm_forward
from .predictors import make_scorer
from .segment_loss import segmented_lm_loss
from .selection import Selection, block_valid, select_blocks, tokens_from_blocks


@dataclass
class _ForwardState:
    """What the decoder's pre-hook saw for the current forward pass."""

    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    layout: TokenLayout | None = None
    selections: dict = field(default_factory=dict)  # layer index -> Selection, for inspection and tests
    shared: Selection | None = None  # the one selection of all sparse layers (shared_selection)
    stream: _Stream | None = None  # the compact run in progress (LeMoConfig.compact_stream)
    layerdrop: bool = False  # the decoder may skip layers (OPT's layerdrop): a skipped one could end no run
    # This forward runs as without LeMo (LeMoConfig.min_sparse_tokens): decided once per forward (_dense_forward)
    # and read by every patched forward (DenseFallback) and LeMo layer.
    dense: bool = False
    always_sparse: bool = False  # never dense (lemo.distributed.sequence: every layer runs sparse)


@dataclass
class _Stream:
    """A compact run of sparse layers in progress: its first layer's input, and the kept rows' RoPE."""

    full: torch.Tensor | None  # taken (and dropped here) by the run's last layer
    rope: object  # rotates kept rows at their positions (lemo.elimination.kept_rope); None without RoPE


class LeMoLayer(nn.Module):
    """A sparse decoder layer. Holds the original layer's children under their original names."""

    gradient_checkpointing = False  # set by transformers' gradient_checkpointing_enable like any layer

    def __init__(
        self, layer: nn.Module, index: int, adapter: Adapter, config: LeMoConfig, scorer, state: _ForwardState
    ):
        super().__init__()
        for name, child in layer.named_children():
            self.add_module(name, child)
        for name, value in vars(layer).items():  # plain attributes the adapter reads (e.g. OPT's dropout)
            if not name.startswith("_") and name != "training":
                object.__setattr__(self, name, value)
        # Plain attributes (not submodules): the original layer and shared per-model objects.
        object.__setattr__(self, "original", layer)
        self.layer_index = index
        self.adapter, self.config, self.scorer, self.state = adapter, config, scorer, state
        self.compact: tuple[bool, bool] | None = None  # (gathers, scatters) in a compact run; set by apply_lemo
        self.gradient_checkpointing = getattr(layer, "gradient_checkpointing", False)
        if hasattr(layer, "_gradient_checkpointing_func"):
            self._gradient_checkpointing_func = layer._gradient_checkpointing_func
        layer.gradient_checkpointing = False  # this wrapper checkpoints; the original must not again
        self.train(layer.training)

    def _active(self) -> bool:
        return self.training or self.config.active_in_eval

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if not self._active():
            self._sync_mode()
            return self.original(hidden_states, *args, **kwargs)
        if self.state.dense:
            return self._dense(hidden_states, *args, **kwargs)  # too short for scoring to pay off
        if self.compact is not None and not self.compact[0] and self.state.stream is not None:
            return self._compact_step(hidden_states, self.state.shared, gather=False)  # inside a compact run
        if _cache_in_use(kwargs):
            raise ValueError(
                "LeMo layers are for training and do not fill a KV cache; pass use_cache=False "
                "or call model.eval() (LeMo is inactive in eval mode)"
            )
        parts = self.adapter.parts(self)
        sel = self.select(parts, hidden_states, kwargs.get("position_embeddings"))
        if self.compact is not None and self.compact[0] and sel.total and not self.state.layerdrop:  # a run starts
            rope = None
            if parts.rope:
                positions, length = kwargs.get("position_embeddings"), hidden_states.shape[1]
                rope = kept_rope(positions, sel, length, self.config.movement_kernel)
            self.state.stream = _Stream(hidden_states, rope)
            return self._compact_step(hidden_states, sel, gather=True)
        frozen = None
        if self.config.eliminated == "frozen":
            frozen = Frozen(self.config.frozen_keys, self.state.layout.doc_ids, self.config.block_size)
        run = functools.partial(
            sparse_layer,
            parts,
            sel=sel,
            position_embeddings=kwargs.get("position_embeddings"),
            mlp_mode=self.config.mlp_mode,
            movement=self.config.movement_kernel,
            frozen=frozen,
        )
        return self._checkpointed(run, hidden_states)

    def _sync_mode(self) -> None:
        """The original layer in this wrapper's train/eval mode: `train()` walks every submodule, so only when
        they differ (per forward it was a measurable share of a short step's launch time)."""
        if self.original.training != self.training:
            self.original.train(self.training)

    def _checkpointed(self, run, *inputs: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._checkpoint_func()(run, *inputs)
        return run(*inputs)

    def _checkpoint_func(self) -> PinnedCheckpoint:
        func = getattr(self, "_gradient_checkpointing_func", None) or functools.partial(checkpoint, use_reentrant=False)
        return func if isinstance(func, PinnedCheckpoint) else PinnedCheckpoint(self.state, func)

    def _compact_step(self, hidden_states: torch.Tensor, sel: Selection, gather: bool) -> torch.Tensor:
        """This layer of the compact run in progress (lemo.elimination.compact_layer)."""
        stream = self.state.stream
        self.state.selections[self.layer_index] = sel
        scatter_into = None
        if self.compact[1]:  # the run's last layer takes the run's input (and the state lets go of it)
            scatter_into, self.state.stream = stream.full, None
        parts = self.adapter.parts(self)

        # The run's input is a checkpoint input, not a closure: reentrant checkpointing gives gradients to
        # inputs only (a closure tensor would be backpropagated through twice).
        def run(hidden, full):
            return compact_layer(
                parts, hidden, sel, stream.rope, gather, scatter_into=full, movement=self.config.movement_kernel
            )

        return self._checkpointed(run, hidden_states, scatter_into)

    def _dense(self, hidden_states: torch.Tensor, *args, **kwargs):
        """The original layer (as in eval mode), checkpointed like the sparse path when that is on."""
        self._sync_mode()
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._checkpoint_func()(functools.partial(self.original, **kwargs), hidden_states, *args)
        return self.original(hidden_states, *args, **kwargs)

    @torch.no_grad()
    def select(self, parts, hidden: torch.Tensor, position_embeddings) -> Selection:
        cfg = self.config
        b, length, _ = hidden.shape
        layout = self.state.layout
        if layout is None or layout.shape != (b, length) or layout.doc_ids.device != hidden.device:
            layout = make_layout(b, length, hidden.device, self.state.attention_mask, self.state.position_ids)
            self.state.layout = layout
        if cfg.shared_selection and self.state.shared is not None:
            self.state.selections[self.layer_index] = self.state.shared
            return self.state.shared
        valid_blocks = block_valid(layout.valid, cfg.block_size)
        if cfg.selection == "topk" and cfg.keep_ratio >= 1.0:
            kept = valid_blocks  # everything is kept: no need to score
        else:
            scores = self.scorer(parts, hidden, position_embeddings, layout, cfg.block_size)
            threshold = cfg.layer_threshold(self.layer_index) if cfg.selection == "threshold" else None
            kept = select_blocks(
                scores,
                valid_blocks,
                keep_ratio=cfg.keep_ratio,
                threshold=threshold,
                keep_first=cfg.keep_first_block,
                keep_last=cfg.keep_last_block,
            )
        sel = tokens_from_blocks(kept, layout.doc_ids, cfg.block_size)
        self.state.selections[self.layer_index] = sel
        if cfg.shared_selection:
            self.state.shared = sel
        return sel


def _cache_in_use(kwargs) -> bool:
    return bool(kwargs.get("use_cache")) or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None


def _dense_forward(config: LeMoConfig, state: _ForwardState, training: bool, length: int | None) -> bool:
    """Whether a forward of `length` tokens runs as without LeMo (LeMoConfig.min_sparse_tokens)."""
    return (
        length is not None
        and length < config.min_sparse_tokens
        and (training or config.active_in_eval)
        and not state.always_sparse
    )


def _input_length(input_ids, inputs_embeds) -> int | None:
    """Tokens per sequence of a decoder / causal LM input (None when neither is given)."""
    if input_ids is not None:
        return input_ids.shape[-1]
    return None if inputs_embeds is None else inputs_embeds.shape[-2]


class DenseFallback:
    """A LeMo forward set on a module instance (norm, MLP, LoRA A). In a dense forward (_ForwardState.dense)
    the forward it replaced runs instead: `prior`, an instance forward set before LeMo's (e.g. Liger's), or
    else the module's class forward."""

    __slots__ = ("lemo", "module", "prior", "state")

    def __init__(self, state: _ForwardState, module: nn.Module, lemo, prior=None):
        self.state, self.module, self.lemo, self.prior = state, module, lemo, prior

    def __call__(self, *args, **kwargs):
        if self.state.dense:
            if self.prior is None:
                return type(self.module).forward(self.module, *args, **kwargs)
            return self.prior(*args, **kwargs)
        return self.lemo(*args, **kwargs)


class PinnedCheckpoint:
    """A decoder layer's checkpoint function whose recomputation (in backward, perhaps after another forward
    of the other kind) runs with the dense decision of the forward that checkpointed it."""

    __slots__ = ("func", "state")

    def __init__(self, state: _ForwardState, func):
        self.state, self.func = state, func

    def __call__(self, run, *args, **kwargs):
        return self.func(functools.partial(_with_dense, self.state, self.state.dense, run), *args, **kwargs)


def _with_dense(state: _ForwardState, dense: bool, run, *args, **kwargs):
    before, state.dense = state.dense, dense
    try:
        return run(*args, **kwargs)
    finally:
        state.dense = before


@dataclass
class LeMoHandle:
    """Everything apply_lemo changed, so remove_lemo can undo it."""

    config: LeMoConfig
    originals: dict  # sparse layer index -> original layer
    patched: list  # (module, its previous instance forward or None): MLPs and norms whose forward was replaced
    hook: object
    state: _ForwardState
    forward_patched: bool
    lora_a: set  # lora_A Linears whose forward was replaced (filled during forwards)
    prior_forward: object = None  # the causal LM's instance forward before ours (e.g. Liger's FLCE forward)
    pinned: list = field(default_factory=list)  # other decoder layers whose checkpoint function we wrapped


def _check_supported(cfg, config: LeMoConfig) -> None:
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True):
        raise ValueError(
            f"{cfg.model_type} uses sliding-window attention ({window}); LeMo's kept-token attention "
            "is full causal: load the model with sliding_window=None"
        )
    if config.mlp_mode == "channel":
        if cfg.model_type == "opt":
            raise ValueError("mlp_mode='channel' needs a gated SiLU MLP (Llama family); use mlp_mode='token' for OPT")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"mlp_mode='channel' supports SiLU MLPs, not {cfg.hidden_act!r}; use mlp_mode='token'")


def apply_lemo(model, config: LeMoConfig | None = None):
    """Apply LeMo to a causal LM (optionally PEFT-wrapped), in place; returns `model`."""
    config = config or LeMoConfig()
    lm = unwrap(model)
    if getattr(lm, "_lemo", None) is not None:
        raise ValueError("LeMo is already applied to this model; call remove_lemo(model) first")
    adapter = get_adapter(lm.config.model_type)
    _check_supported(lm.config, config)
    decoder = adapter.decoder(lm)
    layers = decoder.layers
    sparse = config.resolve_sparse_layers(len(layers))
    for i in sparse:
        adapter.parts(layers[i])  # fails early on unsupported layers (e.g. post-norm OPT)

    state = _ForwardState()
    scorer = make_scorer(config, lm)
    originals = {}
    for i in sparse:
        originals[i] = layers[i]
        layers[i] = LeMoLayer(layers[i], i, adapter, config, scorer, state)
    if _compacts(config):
        for i in sparse:  # each run of consecutive sparse layers gathers at its first and scatters at its last
            layers[i].compact = (i - 1 not in originals, i + 1 not in originals)

    patched = []
    if config.mlp_mode == "channel":
        channel_layers = range(len(layers)) if config.mlp_channel_all_layers else sparse
        for i in channel_layers:
            mlp = layers[i].mlp
            prior = _instance_forward(mlp)
            patched.append((mlp, prior))
            lemo_forward = functools.partial(
                channel_pruned_forward, mlp, config.mlp_keep_channels, active_in_eval=config.active_in_eval
            )
            mlp.forward = DenseFallback(state, mlp, lemo_forward, prior)

    recompute = config.efficient_norm and config.lora_norm_recompute
    lora_a = set()  # PEFT lora_A Linears routed through lemo.lora_norm (PEFT may come after apply_lemo)
    pinned = []

    def dense_fallback(linear, forward):  # lora_A: its class forward (nn.Linear's) when dense
        return DenseFallback(state, linear, forward)

    def capture(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        state.dense = _dense_forward(
            config, state, module.training, _input_length(input_ids, kwargs.get("inputs_embeds"))
        )
        for layer in layers:  # the other layers' norms and MLPs read state.dense when recomputed in backward
            func = getattr(layer, "_gradient_checkpointing_func", None)
            if func is not None and not isinstance(layer, LeMoLayer) and not isinstance(func, PinnedCheckpoint):
                layer._gradient_checkpointing_func = PinnedCheckpoint(state, func)
                if layer not in pinned:
                    pinned.append(layer)
        state.attention_mask = kwargs.get("attention_mask")
        state.position_ids = kwargs.get("position_ids")
        state.layout = None
        state.selections = {}
        state.shared = None
        state.stream = None
        state.layerdrop = bool(module.training and getattr(module, "layerdrop", 0.0))
        if recompute and not state.dense:  # a walk over every module: not in dense forwards, which do not use it
            patch_lora_a(decoder, lora_a, wrap=dense_fallback)
        if (module.training or config.active_in_eval) and kwargs.get("use_cache") is not False:
            # LeMo layers fill no KV cache; a config default of use_cache=True must not make the decoder build one.
            return args, {**kwargs, "use_cache": False}
        return None

    if config.efficient_norm:
        in_layers = {id(m) for layer in layers for m in layer.modules()}  # the final norm feeds no adapter
        for module in decoder.modules():
            if is_rms_norm(module):
                prior = _instance_forward(module)
                patched.append((module, prior))
                lemo_forward = functools.partial(
                    rms_norm_forward, module, tag_output=recompute and id(module) in in_layers
                )
                module.forward = DenseFallback(state, module, lemo_forward, prior)

    hook = decoder.register_forward_pre_hook(capture, with_kwargs=True)
    forward_patched = config.segment_loss_tokens > 0 or config.loss_tokens == "kept"
    prior_forward = _instance_forward(lm)
    if forward_patched:  # wraps the current forward (a Liger FLCE forward stays in charge outside training)
        lm.forward = functools.partial(
            _segmented_forward,
            lm,
            lm.forward,
            config.segment_loss_tokens,
            config.loss_kernel,
            config.loss_tokens == "kept",
        )
    lm._lemo = LeMoHandle(config, originals, patched, hook, state, forward_patched, lora_a, prior_forward, pinned)
    return model


def _compacts(config: LeMoConfig) -> bool:
    """Whether the compact residual stream applies: one selection, kept tokens only, nothing for the rest."""
    return (
        config.compact_stream and config.shared_selection and config.mlp_mode == "token" and config.eliminated == "skip"
    )


def _instance_forward(module: nn.Module):
    """A forward set on the instance by someone before us (Liger binds its kernels there), or None."""
    return module.__dict__.get("forward")


def _restore_forward(module: nn.Module, prior) -> None:
    if prior is None:
        del module.forward
    else:
        module.forward = prior


def remove_lemo(model):
    """Undo apply_lemo: original layers, MLP forwards and model forward restored. Returns `model`."""
    lm = unwrap(model)
    handle = getattr(lm, "_lemo", None)
    if handle is None:
        raise ValueError("LeMo is not applied to this model")
    layers = get_adapter(lm.config.model_type).decoder(lm).layers
    for i, original in handle.originals.items():
        wrapper = layers[i]
        for name, child in wrapper.named_children():  # PEFT may have swapped children since apply
            setattr(original, name, child)
        original.gradient_checkpointing = wrapper.gradient_checkpointing
        func = wrapper.__dict__.get("_gradient_checkpointing_func")  # set on the wrapper if enabled after apply
        if func is not None:  # the wrapper pins it per call (LeMoLayer._checkpoint_func): it is the plain one
            original._gradient_checkpointing_func = func
        original.train(wrapper.training)
        layers[i] = original
    for module, prior in handle.patched:
        _restore_forward(module, prior)
    for module in handle.lora_a:
        del module.forward
    for layer in handle.pinned:
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if isinstance(func, PinnedCheckpoint):
            layer._gradient_checkpointing_func = func.func
    handle.hook.remove()
    if handle.forward_patched:
        _restore_forward(lm, handle.prior_forward)
    lm._lemo = None
    return model


def lemo_state(model) -> _ForwardState:
    """The last forward's layout and per-layer selections (for inspection and tests)."""
    handle = getattr(unwrap(model), "_lemo", None)
    if handle is None:
        raise ValueError("LeMo is not applied to this model")
    return handle.state


def kept_everywhere(state: _ForwardState) -> torch.Tensor | None:
    """(B, L) bool: tokens kept in every sparse layer of the last forward (None before any)."""
    if not state.selections or state.layout is None:
        return None
    b, length = state.layout.shape
    mask = state.layout.valid.reshape(-1).clone()
    for sel in state.selections.values():
        kept = torch.zeros_like(mask)
        kept[sel.index] = True
        mask &= kept
    return mask.view(b, length)


def _segmented_forward(
    lm,
    original_forward,
    segment: int,
    kernel: str,
    kept_loss: bool,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    labels=None,
    inputs_embeds=None,
    **kwargs,
):
    """The causal LM's forward, with the loss computed segment by segment when training with labels (segment
    0: the plain loss) and, with kept_loss, only over the positions kept in every sparse layer. A dense forward
    (LeMoConfig.min_sparse_tokens; decided here from the input, as the decoder's pre-hook decides it again)
    is the wrapped forward's."""
    handle = lm._lemo
    if (
        labels is None
        or not torch.is_grad_enabled()
        or not lm.training
        or _dense_forward(handle.config, handle.state, True, _input_length(input_ids, inputs_embeds))
    ):
        return original_forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs.pop("num_items_in_batch", None)  # the segmented loss is a mean over labelled tokens
    kwargs.pop("logits_to_keep", None)
    kwargs["use_cache"] = False  # the caller may pass it too
    base = getattr(lm, lm.base_model_prefix)
    out = base(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        **kwargs,
    )
    if kept_loss:  # the prediction at position t (label t + 1) counts only when t was kept everywhere
        kept = kept_everywhere(handle.state)
        if kept is not None:
            labels = labels.clone()
            labels[:, 1:].masked_fill_(~kept[:, :-1], -100)
    if segment == 0:  # the plain loss (full-length logits) over the kept positions
        logits = lm.get_output_embeddings()(out.last_hidden_state)
        return CausalLMOutputWithPast(
            loss=lm.loss_function(logits=logits, labels=labels, vocab_size=lm.config.vocab_size), logits=logits
        )
    loss = segmented_lm_loss(out.last_hidden_state, lm.get_output_embeddings(), labels, segment, kernel=kernel)
    return CausalLMOutputWithPast(loss=loss, logits=None)
