"""A GPT-2 style language model built from the fused multi-head causal attention.

token + position embeddings -> n_layer × [LayerNorm -> attention -> add, LayerNorm -> MLP -> add]
-> LayerNorm -> LM head (tied to the token embedding). Shapes: B batch, T tokens, C = n_embd,
V vocabulary, nh heads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.attention import KVCache, MultiHeadAttention

# Embedding and LM-head rows are padded to a multiple of this: matmuls whose sizes are multiples
# of 64 hit the fast kernel paths on GPUs (50257 -> 50304 is ~25% faster in nanoGPT's runs).
VOCAB_PAD_MULTIPLE = 64


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

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}.")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}.")

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> GPTConfig:
        """A named preset (see ``PRESETS``), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, object]:
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


class Block(nn.Module):
    """One transformer block, pre-LayerNorm: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = MultiHeadAttention(
            d_in=config.n_embd,
            d_out=config.n_embd,
            context_length=config.context_length,
            dropout=config.dropout,
            num_heads=config.n_head,
            qkv_bias=config.qkv_bias,
            proj_bias=config.bias,
        )
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
        self.config = config
        self.token_embedding = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.context_length, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
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
        (default ``context_length``) bounds the positions they can hold."""
        max_length = max_length or self.config.context_length
        return [KVCache(max_length) for _ in self.blocks]

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab_size) for token ids (B, T) and, given targets (B, T), the mean
        cross-entropy loss over targets that are not -100.

        With ``kv_caches`` (from ``new_kv_caches``), ``idx`` continues the cached sequence:
        only the new tokens are computed, at their true positions.
        """
        x = self._embed(idx, start=kv_caches[0].length if kv_caches else 0)
        for layer, block in enumerate(self.blocks):
            x, _ = block(x, kv_cache=kv_caches[layer] if kv_caches else None)
        # The padded rows are never real tokens: dropping their logits keeps them out of the
        # softmax, so they are never sampled and never take probability mass in the loss.
        logits = self.lm_head(self.final_norm(x))[..., : self.config.vocab_size]  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def attention_weights(self, idx: Tensor) -> Tensor:
        """Attention weights of every layer and head for token ids (B, T), for inspection.

        Returns (n_layer, B, n_head, T, T); row t holds how much token t attends to each token.
        """
        x = self._embed(idx, start=0)
        maps = []
        for block in self.blocks:
            x, weights = block(x, return_weights=True)
            maps.append(weights)
        return torch.stack(maps)

    def _embed(self, idx: Tensor, start: int) -> Tensor:
        """Token plus position embeddings for ids (B, T) at positions start .. start + T - 1."""
        if idx.dim() != 2:
            raise ValueError(f"Token ids must have shape (batch, tokens), got {tuple(idx.shape)}.")
        end = start + idx.size(1)
        if end > self.config.context_length:
            raise ValueError(
                f"Sequence of {end} tokens is longer than the model's context_length "
                f"({self.config.context_length}); crop the input to its last "
                f"{self.config.context_length} tokens."
            )
        # Reading the ids' values on the host is free for CPU tensors but would stall every
        # accelerator step (and break torch.compile graphs); there the data pipeline checks them.
        if idx.device.type == "cpu" and not torch.compiler.is_compiling():
            low, high = int(idx.min()), int(idx.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"Token ids must lie in [0, {self.config.vocab_size}) for this model, got "
                    f"values in [{low}, {high}]; was the text encoded with another tokenizer?"
                )
        positions = torch.arange(start, end, device=idx.device)  # (T,)
        return self.dropout(self.token_embedding(idx) + self.position_embedding(positions))

    def num_params(self, include_position_embeddings: bool = True) -> int:
        """Parameters counted once each (tied weights once), without the vocabulary padding."""
        count = sum(p.numel() for p in self.parameters())
        padding_rows = self.config.padded_vocab_size - self.config.vocab_size
        count -= padding_rows * self.config.n_embd * (1 if self.config.tie_embeddings else 2)
        if not include_position_embeddings:
            count -= self.position_embedding.weight.numel()
        return count

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B:
        6·N for the weight matmuls plus 12·L·H·Q·T for attention over a full context, with N the
        parameters other than position embeddings."""
        c = self.config
        attention = 12 * c.n_layer * c.n_head * c.head_size * c.context_length
        return 6 * self.num_params(include_position_embeddings=False) + attention
