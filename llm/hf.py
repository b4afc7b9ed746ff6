"""Conversion between ``GPT`` and Hugging Face's GPT-2 (``transformers.GPT2LMHeadModel``).

The two models compute the same function with differently named and shaped weights:

- GPT-2 stores its projections as ``Conv1D`` layers, whose weight is (in, out): the transpose
  of ``nn.Linear``'s (out, in). Every projection is transposed on the way in and out.
- Our embedding and LM head are padded to a multiple of 64 rows; GPT-2's are not. Importing
  adds zero rows, exporting drops them (their logits are never used).
- Our model can leave out biases (``bias=False``, ``qkv_bias=False``); GPT-2 always has them,
  so exporting writes zeros, which computes the same thing.
- GPT-2's ``attn.bias`` and ``attn.masked_bias`` are causal-mask buffers, not weights, and
  older checkpoints (such as OpenAI's own) omit the ``transformer.`` prefix.
- GPT-2 has none of the modern attention options (grouped-query attention, rotary positions,
  sliding windows): exporting a model that uses them raises a ValueError.

This module only converts configs and state dicts; ``llm.checkpoint`` reads and writes the
files. Shapes: C = n_embd, V vocabulary, Vp padded vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from llm.model import GPT, GPTConfig, check_token_id

# Each block's weights: (our name, GPT-2's name, whether GPT-2 stores it transposed).
BLOCK_WEIGHTS: list[tuple[str, str, bool]] = [
    ("norm1.weight", "ln_1.weight", False),
    ("norm1.bias", "ln_1.bias", False),
    ("attn.qkv.weight", "attn.c_attn.weight", True),  # q, k, v stacked the same way in both
    ("attn.qkv.bias", "attn.c_attn.bias", False),
    ("attn.out_proj.weight", "attn.c_proj.weight", True),
    ("attn.out_proj.bias", "attn.c_proj.bias", False),
    ("norm2.weight", "ln_2.weight", False),
    ("norm2.bias", "ln_2.bias", False),
    ("mlp.fc.weight", "mlp.c_fc.weight", True),
    ("mlp.fc.bias", "mlp.c_fc.bias", False),
    ("mlp.proj.weight", "mlp.c_proj.weight", True),
    ("mlp.proj.bias", "mlp.c_proj.bias", False),
]
# Rows indexed by token id: padded in our model, not in GPT-2.
VOCAB_WEIGHTS = ("token_embedding.weight", "lm_head.weight")
# GPT-2's tanh approximation of GELU goes by these names in transformers; ours is the same.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which our model uses


def check_exportable(config: GPTConfig) -> None:
    """Raise a one-line ValueError if ``config`` uses an option that GPT-2 cannot express."""
    if config.is_gpt2:
        return
    options = []
    if config.kv_heads != config.n_head:
        options.append(f"grouped-query attention (n_kv_head={config.kv_heads})")
    if config.pos_embedding != "learned":
        options.append(f"pos_embedding={config.pos_embedding!r}")
    if any(w is not None and w < config.context_length for w in config.layer_windows):
        options.append(f"sliding_window={config.sliding_window!r}")
    raise ValueError(
        f"a Hugging Face GPT-2 cannot express this model's {', '.join(options)}; save it with "
        "llm.checkpoint.save_model (safetensors) instead"
    )


def to_hf_config(config: GPTConfig, eot_token: int | None = None) -> dict[str, Any]:
    """The ``config.json`` of a GPT-2 with ``config``'s sizes; ``eot_token``, if given, becomes
    its begin- and end-of-sequence token. Raises ValueError for options GPT-2 lacks."""
    check_exportable(config)
    check_token_id(eot_token, config.vocab_size, "eot_token")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "scale_attn_weights": True,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eot_token,
        "eos_token_id": eot_token,
    }


def from_hf_config(hf_config: dict[str, Any]) -> GPTConfig:
    """The ``GPTConfig`` of a GPT-2 ``config.json``; raises ValueError for GPT-2 variants that
    our model does not compute (another activation, a custom MLP width, ...)."""
    config = GPTConfig(  # checks the sizes' types and values
        vocab_size=hf_config.get("vocab_size", 50257),
        context_length=hf_config.get("n_positions", 1024),
        n_layer=hf_config.get("n_layer", 12),
        n_head=hf_config.get("n_head", 12),
        n_embd=hf_config.get("n_embd", 768),
        dropout=hf_config.get("resid_pdrop", 0.1),
        bias=True,
        qkv_bias=True,
        tie_embeddings=hf_config.get("tie_word_embeddings", True),
    )
    # (key, transformers' default, the values our model computes exactly)
    checks = [
        ("model_type", "gpt2", ("gpt2",)),
        ("activation_function", "gelu_new", TANH_GELU),
        ("n_inner", None, (None, 4 * config.n_embd)),
        ("layer_norm_epsilon", LAYER_NORM_EPS, (LAYER_NORM_EPS,)),
        ("scale_attn_weights", True, (True,)),
        ("scale_attn_by_inverse_layer_idx", False, (False,)),
        ("add_cross_attention", False, (False,)),
    ]
    for key, default, accepted in checks:
        value = hf_config.get(key, default)
        if value not in accepted:
            raise ValueError(
                f"GPT-2 config has {key}={value!r}, which llm's GPT does not compute; "
                f"it supports {' or '.join(map(repr, accepted))}"
            )
    return config


def weight_names(config: GPTConfig) -> dict[str, tuple[str, bool]]:
    """Our name of every weight -> (GPT-2's name, whether GPT-2 stores it transposed)."""
    names = {
        "token_embedding.weight": ("transformer.wte.weight", False),
        "position_embedding.weight": ("transformer.wpe.weight", False),
    }
    for layer in range(config.n_layer):
        for ours, theirs, transposed in BLOCK_WEIGHTS:
            names[f"blocks.{layer}.{ours}"] = (f"transformer.h.{layer}.{theirs}", transposed)
    names["final_norm.weight"] = ("transformer.ln_f.weight", False)
    names["final_norm.bias"] = ("transformer.ln_f.bias", False)
    if not config.tie_embeddings:  # tied, GPT-2's lm_head.weight is wte.weight
        names["lm_head.weight"] = ("lm_head.weight", False)
    return names


def to_hf_state_dict(state_dict: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """GPT-2 weights (``GPT2LMHeadModel`` names and shapes) from our model's state dict.
    Raises ValueError for options GPT-2 lacks."""
    check_exportable(config)
    hf = {}
    for ours, (theirs, transposed) in weight_names(config).items():
        if ours in state_dict:
            tensor = state_dict[ours]
        else:  # a bias the model leaves out: zeros, one per output of its layer
            weight = state_dict[ours.removesuffix("bias") + "weight"]
            tensor = weight.new_zeros(weight.size(0))
        if ours in VOCAB_WEIGHTS:
            tensor = tensor[: config.vocab_size]  # (Vp, C) -> (V, C)
        hf[theirs] = (tensor.t() if transposed else tensor).detach().contiguous()
    return hf


def from_hf_state_dict(hf_state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """Our model's state dict from GPT-2 weights. The causal-mask buffers and a tied
    ``lm_head.weight`` are skipped; missing or unexpected weights raise a ValueError."""
    hf = {_full_name(name): tensor for name, tensor in hf_state.items() if not _is_buffer(name)}
    if config.tie_embeddings:
        hf.pop("lm_head.weight", None)
    names = weight_names(config)
    expected = {theirs for theirs, _ in names.values()}
    if missing := sorted(expected - hf.keys()):
        raise ValueError(f"GPT-2 weights lack {len(missing)} tensors, such as {missing[0]}")
    if unexpected := sorted(hf.keys() - expected):
        raise ValueError(
            f"GPT-2 weights hold {len(unexpected)} tensors that its config has no place for, "
            f"such as {unexpected[0]}"
        )
    # Shapes checked before any transposing or padding, which would fail on a tensor of another
    # rank, and as GPT-2 stores them: (V, C) tables, Conv1D weights as (in, out).
    with torch.device("meta"):  # no memory, no initialisation
        shapes = {name: list(t.shape) for name, t in GPT(config).state_dict().items()}
    wrong = []
    for name, (theirs, transposed) in names.items():
        if name not in shapes:  # a bias the model leaves out: one per output of its layer
            want = shapes[name.removesuffix("bias") + "weight"][:1]
        elif name in VOCAB_WEIGHTS:
            want = [config.vocab_size, *shapes[name][1:]]
        else:
            want = shapes[name]
        want = tuple(reversed(want) if transposed else want)
        if tuple(hf[theirs].shape) != want:
            wrong.append(f"{theirs} has shape {tuple(hf[theirs].shape)}, not {want}")
    if wrong:
        raise ValueError(
            f"GPT-2 weights do not fit their config: {wrong[0]}"
            + (f" ({len(wrong)} tensors do not fit)" if len(wrong) > 1 else "")
        )
    ours = {}
    for name, (theirs, transposed) in names.items():
        tensor = hf[theirs].t() if transposed else hf[theirs]
        if name in VOCAB_WEIGHTS:  # (V, C) -> (Vp, C) with zero rows, never looked up
            padding = config.padded_vocab_size - config.vocab_size
            tensor = torch.cat([tensor, tensor.new_zeros(padding, tensor.size(1))])
        ours[name] = tensor.contiguous()
    return ours


def _full_name(name: str) -> str:
    """GPT-2 names with the ``transformer.`` prefix, which OpenAI's checkpoints leave out."""
    return name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"


def _is_buffer(name: str) -> bool:
    return name.endswith((".attn.bias", ".attn.masked_bias"))
