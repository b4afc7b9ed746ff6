"""A GPT-2 style language model built from the fused multi-head causal attention.

token + position embeddings -> n_layer × [LayerNorm -> attention -> add, LayerNorm -> MLP -> add]
-> LayerNorm -> LM head (tied to the token embedding). Shapes: B batch, T tokens, C = n_embd,
V vocabulary, nh heads.

Options, all off by default (GPT-2): grouped-query attention (``n_kv_head``), rotary position
embeddings instead of the learned table (``pos_embedding="rope"``) and sliding-window attention
(``sliding_window``), from steps 6 to 8 of ``llm.attention``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.attention import (
    GroupedQueryAttention,
    KVCache,
    MultiHeadAttention,
    RotaryAttention,
    SlidingWindowAttention,
)
from llm.loss import IGNORE_INDEX, LinearCrossEntropy, linear_cross_entropy
from llm.values import (
    is_positive_finite,
    is_positive_integer,
    is_probability_below_one,
    is_whole_number,
)

# Embedding and LM-head rows are padded to a multiple of this: matmuls whose sizes are multiples
# of 64 hit the fast kernel paths on GPUs (50257 -> 50304 is ~25% faster in nanoGPT's runs).
VOCAB_PAD_MULTIPLE = 64

# torch.compile indexes a tensor of 2**31 elements or more with 64-bit integers, whose
# arithmetic is slow on GPUs: GPT.head_loss makes logits in chunks of rows that stay below this.
MAX_LOGITS_PER_CHUNK = 2**31 - 1

# What wrappers insert into parameter names: FSDP units, activation checkpointing, torch.compile.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def own_parameter_name(name: str) -> str:
    """A GPT parameter's name as the GPT itself calls it, from its name seen through wrappers:
    ``blocks.0._fsdp_wrapped_module.attn.qkv.weight`` -> ``blocks.0.attn.qkv.weight``."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _counted(number: int, thing: str) -> str:
    """``1 layer``, ``12 layers``."""
    return f"{number} {thing}{'' if number == 1 else 's'}"


def check_token_ids(
    idx: object, context_length: int, start: int = 0, what: str = "The sequence"
) -> None:
    """Raise a one-line error unless ``idx`` is token ids (B, T), B and T at least 1, that fit
    positions ``start`` .. ``start + T - 1`` of the context. Only the tensor's description is
    read, not its values: that would wait on a GPU (``GPT._check_in_vocabulary`` reads them)."""
    if not isinstance(idx, Tensor):
        raise TypeError(f"Token ids must be a tensor (torch.tensor(ids)), got {type(idx)}.")
    if idx.dtype not in (torch.long, torch.int):  # what an embedding lookup takes
        raise ValueError(f"Token ids must be torch.long (call .long()), got {idx.dtype}.")
    if idx.dim() != 2 or 0 in idx.shape:
        raise ValueError(
            f"Token ids must have shape (batch, tokens) with at least one sequence of at "
            f"least one token, got {tuple(idx.shape)}."
        )
    if start + idx.size(1) > context_length:
        raise ValueError(
            f"{what} of {start + idx.size(1)} tokens is longer than the model's context_length "
            f"({context_length}); crop it to its last {context_length} tokens."
        )


def check_token_id(token: object, vocab_size: int, name: str) -> None:
    """Raise a one-line ValueError unless ``token`` is None or a token id in [0, vocab_size)."""
    is_id = is_whole_number(token) and 0 <= token < vocab_size  # type: ignore[operator]
    if token is not None and not is_id:
        raise ValueError(f"{name} must be a token id in [0, {vocab_size}) or None, got {token!r}")


def _matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype that x's matmuls run in: autocast's where it is on, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


@dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of a GPT; checked on construction. Defaults are GPT-2 small (124M)."""

    vocab_size: int = 50257
    context_length: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in the LayerNorms, MLP and attention output projection
    qkv_bias: bool = True  # biases in the query/key/value projection
    tie_embeddings: bool = True  # the LM head reuses the token embedding matrix
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None: n_head
    pos_embedding: str = "learned"  # "learned" (a position table, GPT-2) or "rope" (rotary)
    rope_theta: float = 10000.0  # RoPE's frequency base
    # None (full causal attention), one window for every layer, or a list with one int or None
    # per layer. Typed Any because OmegaConf cannot type a union with a list; checked below.
    sliding_window: Any = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not is_positive_integer(value):
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}.")
        for name in ("bias", "qkv_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):  # "false" would be true
                raise ValueError(
                    f"GPTConfig.{name} must be True or False, got {getattr(self, name)!r}."
                )
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}."
            )
        if not is_probability_below_one(self.dropout):
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        kv = self.n_kv_head
        if kv is not None and (not is_positive_integer(kv) or self.n_head % kv):
            raise ValueError(
                f"GPTConfig.n_head ({self.n_head}) must be divisible by n_kv_head ({kv!r}): "
                "each key/value head serves a group of query heads."
            )
        if self.pos_embedding not in ("learned", "rope"):
            raise ValueError(
                f"GPTConfig.pos_embedding must be 'learned' or 'rope', got {self.pos_embedding!r}."
            )
        if self.pos_embedding == "rope" and self.head_size % 2:
            raise ValueError(
                f"GPTConfig.pos_embedding='rope' needs an even head size (n_embd / n_head), "
                f"got {self.head_size}."
            )
        if not is_positive_finite(self.rope_theta):
            raise ValueError(
                f"GPTConfig.rope_theta must be a positive finite number, got {self.rope_theta!r}."
            )
        window = self.sliding_window
        if isinstance(window, list | tuple):
            if len(window) != self.n_layer:
                raise ValueError(
                    f"GPTConfig.sliding_window has {len(window)} entries but the model has "
                    f"n_layer={self.n_layer}: give one window (or None) per layer."
                )
            bad = [w for w in window if w is not None and not is_positive_integer(w)]
        else:
            bad = [window] if window is not None and not is_positive_integer(window) else []
        if bad:
            raise ValueError(
                f"GPTConfig.sliding_window must be None, a positive integer or a list of them "
                f"(one per layer), got {bad[0]!r}."
            )

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and LM head: ``vocab_size`` rounded up to a multiple of 64,
        which the matmul kernels handle faster; the extra rows are never used."""
        return math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    @property
    def head_size(self) -> int:
        """Dimensions per attention head."""
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads per layer: ``n_kv_head``, or ``n_head`` when it is None."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def layer_windows(self) -> list[int | None]:
        """Each layer's sliding window, None for full causal attention."""
        if isinstance(self.sliding_window, list | tuple):
            return list(self.sliding_window)
        return [self.sliding_window] * self.n_layer

    @property
    def is_gpt2(self) -> bool:
        """Whether this is a plain GPT-2 architecture: no option of ``llm.attention``'s steps
        6-8 (what a Hugging Face GPT-2 can express)."""
        return (
            self.kv_heads == self.n_head
            and self.pos_embedding == "learned"
            and all(w is None or w >= self.context_length for w in self.layer_windows)
        )

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> GPTConfig:
        """A named preset (see ``PRESETS``), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, object]:
        """The fields as plain values, as checkpoints store them."""
        return asdict(self)


PRESETS: dict[str, GPTConfig] = {
    # The four GPT-2 sizes.
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # Small models that train on a CPU in minutes (sizes as in minGPT).
    "gpt-mini": GPTConfig(n_layer=6, n_head=6, n_embd=192, context_length=256),
    "gpt-micro": GPTConfig(n_layer=4, n_head=4, n_embd=128, context_length=128),
    "gpt-nano": GPTConfig(n_layer=3, n_head=3, n_embd=48, context_length=64),
    # Modern attention (llm.attention steps 6-8): rotary positions, grouped-query attention.
    # gpt-micro's size, trains on a CPU in minutes; 2 key/value heads for 4 query heads.
    "gpt-micro-modern": GPTConfig(
        n_layer=4, n_head=4, n_kv_head=2, n_embd=128, context_length=128, pos_embedding="rope"
    ),
    # GPT-2 small's size for a GPU: 4 key/value heads for 12 query heads, and every other layer
    # local (a 256-token window), as in Gemma 2. About 114M parameters.
    "gpt2-modern": GPTConfig(
        n_layer=12,
        n_head=12,
        n_kv_head=4,
        n_embd=768,
        pos_embedding="rope",
        sliding_window=[256, None] * 6,
    ),
}


class MLP(nn.Module):
    """Position-wise feed-forward network: C -> 4C -> GELU -> C."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        # GPT-2 used the tanh approximation of GELU; matching it keeps its weights exact.
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


def attention_for(config: GPTConfig, layer: int) -> MultiHeadAttention:
    """The attention of block ``layer``: the simplest step of the ladder that computes what the
    config asks for (``MultiHeadAttention`` for GPT-2). Every step has the same weights'
    names, so the options never rename GPT-2's."""
    common: dict[str, Any] = {
        "d_in": config.n_embd,
        "d_out": config.n_embd,
        "context_length": config.context_length,
        "dropout": config.dropout,
        "num_heads": config.n_head,
        "qkv_bias": config.qkv_bias,
        "proj_bias": config.bias,
    }
    rope_theta = config.rope_theta if config.pos_embedding == "rope" else None
    window = config.layer_windows[layer]
    if window is not None:
        return SlidingWindowAttention(
            **common, num_kv_heads=config.kv_heads, rope_theta=rope_theta, window=window
        )
    if rope_theta is not None:
        return RotaryAttention(**common, num_kv_heads=config.kv_heads, rope_theta=rope_theta)
    if config.kv_heads != config.n_head:
        return GroupedQueryAttention(**common, num_kv_heads=config.kv_heads)
    return MultiHeadAttention(**common)


class Block(nn.Module):
    """One transformer block, pre-LayerNorm: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = attention_for(config, layer)
        self.norm2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, kv_cache: KVCache | None = None, return_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """(B, T, C) -> (B, T, C), and the (B, nh, T, S) attention weights if asked for."""
        h = self.norm1(x)
        if return_weights:
            attended, weights = self.attn(h, kv_cache=kv_cache, return_weights=True)
        else:
            attended, weights = self.attn(h, kv_cache=kv_cache), None
        x = x + self.dropout(attended)
        x = x + self.dropout(self.mlp(self.norm2(x)))
        return x, weights


class GPT(nn.Module):
    """A GPT-2 style decoder-only transformer."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(
                f"GPT takes a GPTConfig, got {type(config).__name__}: use "
                "GPT(GPTConfig.from_preset(name)) or GPT(GPTConfig(**fields))"
            )
        self.config = config
        self.token_embedding = nn.Embedding(config.padded_vocab_size, config.n_embd)
        # With RoPE, positions are rotations inside the attention: no table to learn.
        self.position_embedding = (
            nn.Embedding(config.context_length, config.n_embd)
            if config.pos_embedding == "learned"
            else None
        )
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.final_norm = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.tie_weights()
        self.reset_parameters()

    def tie_weights(self) -> None:
        """With ``tie_embeddings``, make the LM head use the token embedding matrix: one matrix
        maps token ids to vectors and vectors back to token scores. Call it again after
        anything that replaces parameters, such as ``load_state_dict(..., assign=True)``."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) weights, zero biases, and the projections that write
        into the residual stream scaled by 1/sqrt(2 · n_layer), so the stream's variance does
        not grow with depth (each block adds to it twice)."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.out_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    def new_kv_caches(self, max_length: int | None = None) -> list[KVCache]:
        """One empty cache per layer, for ``forward(..., kv_caches=...)``; ``max_length``
        (default ``context_length``) bounds the positions they can hold. A sliding-window
        layer's cache keeps only its window."""
        max_length = self.config.context_length if max_length is None else max_length
        return [KVCache(max_length, window) for window in self.config.layer_windows]

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab_size) for token ids (B, T) and, given targets (B, T), the mean
        cross-entropy loss over targets that are not ``IGNORE_INDEX`` (-100).

        With ``kv_caches`` (from ``new_kv_caches``), ``idx`` continues the cached sequence:
        only the new tokens are computed, at their true positions.
        """
        return self.head(self._transform(idx, kv_caches), targets)

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """The mean cross-entropy loss of ``forward`` alone: what a training step needs.

        Compile this, not ``forward``, for training. Compiled, every output takes a gradient in
        the backward pass: ``forward``'s logits would take a zero-filled (B, T, V) one. This
        never even keeps the whole logits (see ``head_loss``)."""
        return self.head_loss(self._transform(idx), targets)

    def head_loss(self, x: Tensor, targets: Tensor) -> Tensor:
        """The last block's output (B, T, C) -> the mean loss of ``head``, without its logits.

        The logits are made in chunks of rows, each under ``MAX_LOGITS_PER_CHUNK`` logits
        (42,690 tokens with GPT-2's vocabulary). Compiled, with gradients wanted, the LM head
        and the loss are one step, ``LinearCrossEntropy``: it works out the logits' gradient
        while each chunk exists, so the step's largest tensor is never kept for the backward
        pass. Eager, autograd differentiates PyTorch's cross-entropy instead: uncompiled, each
        step of the hand-made gradient is a pass of its own over the logits, slower than
        PyTorch's fused kernels (1.6 against 1.2 s for gpt-micro's head on a 2-core CPU); and
        so does fp16, whose loss scale must reach the logits' gradient before it is rounded."""
        self._check_targets(targets, x.shape[:-1])
        x, targets = self.final_norm(x).flatten(0, 1), targets.flatten()  # (B·T, C), (B·T,)
        weight = self.lm_head.weight  # (V_padded, C)
        max_rows = MAX_LOGITS_PER_CHUNK // self.config.padded_vocab_size
        args = (x, weight, targets, self.config.vocab_size, max_rows)
        wants_grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        if wants_grads and torch.compiler.is_compiling() and _matmul_dtype(x) != torch.float16:
            return cast(Tensor, LinearCrossEntropy.apply(*args))
        return linear_cross_entropy(*args)[0]

    def _transform(self, idx: Tensor, kv_caches: list[KVCache] | None = None) -> Tensor:
        """Token ids (B, T) -> the last block's output (B, T, C)."""
        if kv_caches is not None and len(kv_caches) != self.config.n_layer:
            raise ValueError(
                f"Give one KV cache per layer ({self.config.n_layer}, from new_kv_caches()), "
                f"got {len(kv_caches)}."
            )
        x = self._embed(idx, start=kv_caches[0].length if kv_caches else 0)
        for layer, block in enumerate(self.blocks):
            x, _ = block(x, kv_cache=kv_caches[layer] if kv_caches else None)
        return x

    def head(self, x: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The last block's output (B, T, C) -> logits (B, T, V) and, given targets, the loss.

        For generation and inspection, which want the logits. Training wants only the loss and
        takes ``head_loss``, which never keeps the whole logits: with GPT-2's vocabulary they
        are a step's largest tensor."""
        # The padded rows are never real tokens: dropping their logits keeps them out of the
        # softmax, so they are never sampled and never take probability mass in the loss.
        logits = self.lm_head(self.final_norm(x))[..., : self.config.vocab_size]  # (B, T, V)
        if targets is None:
            return logits, None
        self._check_targets(targets, logits.shape[:-1])
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    def _check_targets(self, targets: Tensor, shape: torch.Size) -> None:
        """Raise a ValueError unless the targets are token ids (torch.long) of the given shape,
        each in the vocabulary or ``IGNORE_INDEX``."""
        if targets.shape != shape or targets.dtype != torch.long:
            raise ValueError(
                f"Targets must be torch.long of the token ids' shape {tuple(shape)}, "
                f"got {targets.dtype} of shape {tuple(targets.shape)}."
            )
        self._check_in_vocabulary(targets, "Targets", ignore_index=IGNORE_INDEX)

    @torch.no_grad()
    def attention_weights(self, idx: Tensor) -> Tensor:
        """Attention weights of every layer and head for token ids (B, T), for inspection.

        Returns (n_layer, B, n_head, T, T); row t holds how much token t attends to each token.
        With grouped-query attention each query head has its map; with a sliding window the
        maps are bands.
        """
        x = self._embed(idx, start=0)
        maps = []
        for block in self.blocks:
            x, weights = block(x, return_weights=True)
            maps.append(weights)
        return torch.stack(maps)

    def _embed(self, idx: Tensor, start: int) -> Tensor:
        """Token plus position embeddings (none with RoPE) for ids (B, T) at positions
        start .. start + T - 1."""
        check_token_ids(idx, self.config.context_length, start)
        self._check_in_vocabulary(idx, "Token ids")
        x = self.token_embedding(idx)  # (B, T, C)
        if self.position_embedding is not None:  # with RoPE the attention adds positions
            positions = torch.arange(start, start + idx.size(1), device=idx.device)
            x = x + self.position_embedding(positions)
        if _matmul_dtype(x) == torch.bfloat16:
            # Under bf16 autocast the residual stream is carried in bf16, as llm.c does: every
            # norm, residual add and their gradients move half the bytes of fp32 (4% of a GPT-2
            # step on an H200). Weights, norms' arithmetic and the loss stay fp32. (fp16's
            # narrow range could overflow: its stream stays fp32.)
            x = x.to(torch.bfloat16)
        return self.dropout(x)

    def _check_in_vocabulary(self, ids: Tensor, what: str, ignore_index: int | None = None) -> None:
        """Raise a ValueError unless every id lies in [0, vocab_size) (or is ``ignore_index``)."""
        # Reading the ids' values on the host is free for CPU tensors but would stall every
        # accelerator step (and break torch.compile graphs); there the data pipeline checks them.
        if ids.device.type != "cpu" or torch.compiler.is_compiling():
            return
        real = ids[ids != ignore_index] if ignore_index is not None else ids
        if not real.numel():
            return
        low, high = int(real.min()), int(real.max())
        if low < 0 or high >= self.config.vocab_size:
            ignored = f" (or {ignore_index}, ignored)" if ignore_index is not None else ""
            raise ValueError(
                f"{what} must lie in [0, {self.config.vocab_size}){ignored} for this model, got "
                f"values in [{low}, {high}]; was the text encoded with another tokenizer?"
            )

    def num_params(self, include_position_embeddings: bool = True) -> int:
        """Parameters counted once each (tied weights once), without the vocabulary padding."""
        count = sum(p.numel() for p in self.parameters())
        padding_rows = self.config.padded_vocab_size - self.config.vocab_size
        count -= padding_rows * self.config.n_embd * (1 if self.config.tie_embeddings else 2)
        if not include_position_embeddings and self.position_embedding is not None:
            count -= self.position_embedding.weight.numel()
        return count

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B:
        6·N for the weight matmuls plus 12·L·H·Q·T for attention over a full context, with N the
        parameters that multiply: all but the tables looked up (position embeddings, and token
        embeddings unless the LM head shares them). A sliding-window layer attends to at most its
        window, so its T is the window; grouped-query attention does not change the count (each
        query head still scores every key it sees)."""
        c = self.config
        matmul_params = self.num_params(include_position_embeddings=False)
        if not c.tie_embeddings:  # the LM head is counted on its own
            matmul_params -= c.vocab_size * c.n_embd
        reach = sum(min(w or c.context_length, c.context_length) for w in c.layer_windows)
        attention = 12 * c.n_head * c.head_size * reach  # reach = L·T without windows
        return 6 * matmul_params + attention

    def summary(self) -> str:
        """One line on the model, e.g. ``GPT: 4 layers, 4 heads, width 128, context 128,
        vocabulary 50257 (padded to 50304); 7.24M parameters, 44.1 MFLOP per token to train``."""
        c = self.config
        padded = (
            f" (padded to {c.padded_vocab_size})" if c.padded_vocab_size != c.vocab_size else ""
        )
        return (
            f"GPT: {_counted(c.n_layer, 'layer')}, {_counted(c.n_head, 'head')}, "
            f"width {c.n_embd}, context {c.context_length}, vocabulary {c.vocab_size}{padded}; "
            f"{self.num_params() / 1e6:.2f}M parameters, "
            f"{self.flops_per_token() / 1e6:.1f} MFLOP per token to train"
        )
