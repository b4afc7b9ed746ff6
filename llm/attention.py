"""Attention, built up step by step.

Each step adds one idea to the step above it:

1. ``simple_self_attention``: context vectors as softmax-weighted sums of the inputs, no weights.
2. ``SelfAttention``: trainable query, key and value projections and 1/sqrt(d_k) scaling.
3. ``CausalAttention``: a causal mask hides future tokens; dropout on the attention weights.
4. ``MultiHeadAttentionWrapper``: several causal heads side by side, outputs concatenated.
5. ``MultiHeadAttention``: the same computation as one fused module, running on
   ``F.scaled_dot_product_attention``, with an output projection and a key/value cache.
   This is the module the GPT in ``llm.model`` uses.

Every step can return its attention weights (``return_weights=True``) so that the ladder can
be inspected side by side. Shapes: B batch, T tokens, S key positions (T plus any cached
ones), nh heads, hs head size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionOutput = Tensor | tuple[Tensor, Tensor]


def causal_mask(num_queries: int, num_keys: int, device: torch.device | None = None) -> Tensor:
    """Boolean (T, S) mask, True where a query may attend to a key.

    The T queries are the last T of the S positions, so query i sits at position S - T + i and
    sees keys 0 .. S - T + i. With T == S this is the usual lower triangle.
    """
    ones = torch.ones(num_queries, num_keys, dtype=torch.bool, device=device)
    return ones.tril(diagonal=num_keys - num_queries)


def scaled_attention_weights(queries: Tensor, keys: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ / sqrt(d_k)) over the keys, with positions where ``mask`` is False hidden.

    queries (..., T, d_k), keys (..., S, d_k), mask broadcastable to (..., T, S) -> (..., T, S).
    """
    scores = queries @ keys.transpose(-2, -1)  # (..., T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # Dividing by sqrt(d_k) keeps the scores' variance near 1, so the softmax does not saturate
    # into near one-hot weights with vanishing gradients as d_k grows.
    return torch.softmax(scores / math.sqrt(keys.size(-1)), dim=-1)


# --- Step 1 ---------------------------------------------------------------------------------


def simple_self_attention(x: Tensor, return_weights: bool = False) -> AttentionOutput:
    """Self-attention with no trainable weights.

    The attention score of token i for token j is the dot product x_i · x_j; a softmax over each
    row turns the scores into attention weights that sum to 1, and each context vector is the
    weighted sum of all inputs. Works on (T, d) and (B, T, d) inputs alike.
    """
    scores = x @ x.transpose(-2, -1)  # (..., T, T)
    weights = torch.softmax(scores, dim=-1)  # (..., T, T), rows sum to 1
    context = weights @ x  # (..., T, d)
    return (context, weights) if return_weights else context


# --- Step 2 ---------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Adds trainable query, key and value projections to simple self-attention.

    Each input is projected three ways: the query asks "what am I looking for?", the key says
    "what do I contain?", and the value is what gets mixed into the context vector. Scores are
    q·k scaled by 1/sqrt(d_k). Works on (T, d_in) and (B, T, d_in) inputs.
    """

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False) -> None:
        super().__init__()
        self.d_out = d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def attention_weights(self, queries: Tensor, keys: Tensor) -> Tensor:
        """(..., T, d_out) queries and keys -> (..., T, T) weights. Subclasses add masking."""
        return scaled_attention_weights(queries, keys)

    def forward(self, x: Tensor, return_weights: bool = False) -> AttentionOutput:
        queries, keys, values = self.W_query(x), self.W_key(x), self.W_value(x)  # (..., T, d_out)
        weights = self.attention_weights(queries, keys)  # (..., T, T)
        context = weights @ values  # (..., T, d_out)
        return (context, weights) if return_weights else context


# --- Step 3 ---------------------------------------------------------------------------------


class CausalAttention(SelfAttention):
    """Adds a causal mask and dropout to self-attention.

    A language model predicts the next token, so token t may only look at tokens 0..t. A mask,
    registered as a buffer so it moves with the module between devices, hides every later token
    before the softmax (its weight becomes exactly zero). Dropout then zeroes random attention
    weights during training. Inputs are batched: (B, T, d_in) with T <= context_length.
    """

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, qkv_bias: bool = False
    ) -> None:
        super().__init__(d_in, d_out, qkv_bias)
        self.dropout = nn.Dropout(dropout)
        # Not persistent: it is derived from context_length, so it need not bloat checkpoints.
        self.register_buffer("mask", causal_mask(context_length, context_length), persistent=False)

    def attention_weights(self, queries: Tensor, keys: Tensor) -> Tensor:
        num_tokens = queries.size(-2)
        weights = scaled_attention_weights(queries, keys, self.mask[:num_tokens, :num_tokens])
        return self.dropout(weights)


# --- Step 4 ---------------------------------------------------------------------------------


class MultiHeadAttentionWrapper(nn.Module):
    """Adds several heads: ``num_heads`` causal attention heads run side by side.

    Each head has its own projections of width d_out / num_heads and can learn to attend to a
    different kind of relation; their context vectors are concatenated back to d_out. Simple,
    but the heads run one after another.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        head_dim = _head_dim(d_out, num_heads)
        self.heads = nn.ModuleList(
            CausalAttention(d_in, head_dim, context_length, dropout, qkv_bias)
            for _ in range(num_heads)
        )

    def forward(self, x: Tensor, return_weights: bool = False) -> AttentionOutput:
        outputs = [head(x, return_weights=True) for head in self.heads]
        context = torch.cat([context for context, _ in outputs], dim=-1)  # (B, T, d_out)
        weights = torch.stack([weights for _, weights in outputs], dim=1)  # (B, nh, T, T)
        return (context, weights) if return_weights else context


# --- Step 5 ---------------------------------------------------------------------------------


class KVCache:
    """Keys and values of the positions seen so far, for one attention layer.

    Storage for ``max_length`` positions is allocated at the first ``append``, with the batch
    size, heads, dtype and device of the keys it receives; later appends write in place and
    never copy the past. ``length`` is a Python int, so reading it never waits on the device.
    """

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.length = 0
        self.keys: Tensor | None = None  # (B, nh, max_length, hs) once allocated
        self.values: Tensor | None = None

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store (B, nh, T, hs) new keys and values; return all (B, nh, length, hs) so far."""
        end = self.length + keys.size(2)
        if end > self.max_length:
            raise ValueError(
                f"KV cache is full: {end} positions do not fit its {self.max_length}; "
                "start a new cache or crop the input."
            )
        if self.keys is None or self.values is None:
            B, nh, _, hs = keys.shape
            self.keys = keys.new_zeros(B, nh, self.max_length, hs)
            self.values = values.new_zeros(B, nh, self.max_length, hs)
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class MultiHeadAttention(nn.Module):
    """The wrapper's computation as one compact, fast module: the one the GPT uses.

    What it adds to the wrapper:

    - one fused QKV projection for all heads, split into heads by view/transpose;
    - ``F.scaled_dot_product_attention``, which never materialises the (T, T) weights and runs
      flash or memory-efficient kernels on GPUs;
    - an output projection that mixes the heads' outputs;
    - a ``KVCache`` for incremental decoding: each new token attends to the cached past instead
      of recomputing it.

    ``return_weights=True`` takes an explicit softmax path that builds the weights, for
    inspection only; training never uses it. Dropout acts only in training mode.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
        proj_bias: bool = True,
    ) -> None:
        super().__init__()
        self.head_dim = _head_dim(d_out, num_heads)
        self.d_out = d_out
        self.num_heads = num_heads
        self.context_length = context_length
        self.dropout = dropout
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out, bias=proj_bias)

    def forward(
        self, x: Tensor, kv_cache: KVCache | None = None, return_weights: bool = False
    ) -> AttentionOutput:
        B, T, _ = x.shape
        # (B, T, 3·d_out) -> three (B, T, nh, hs) -> (B, nh, T, hs)
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim)
        queries, keys, values = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if kv_cache is not None:
            keys, values = kv_cache.append(keys, values)  # (B, nh, S, hs)
        S = keys.size(2)
        dropout_p = self.dropout if self.training else 0.0

        if return_weights:
            weights = scaled_attention_weights(queries, keys, causal_mask(T, S, x.device))
            context = F.dropout(weights, dropout_p) @ values  # (B, nh, T, hs)
        else:
            # Without a cache T == S and the kernel's own causal masking is fastest. Queries that
            # follow cached keys sit at positions S - T .. S - 1 and need an explicit mask.
            mask = None if S == T else causal_mask(T, S, x.device)
            context = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None
            )  # (B, nh, T, hs)
        context = context.transpose(1, 2).reshape(B, T, self.d_out)  # heads side by side again
        output = self.out_proj(context)  # (B, T, d_out)
        return (output, weights) if return_weights else output


@torch.no_grad()
def copy_wrapper_into_fused(wrapper: MultiHeadAttentionWrapper, fused: MultiHeadAttention) -> None:
    """Give ``fused`` the wrapper's heads, so that both compute the same attention weights.

    The fused projection stacks every head's query rows, then every head's key rows, then the
    value rows. The wrapper has no output projection, so the fused one becomes the identity.
    """
    heads = wrapper.heads
    for part, name in enumerate(("W_query", "W_key", "W_value")):
        rows = slice(part * fused.d_out, (part + 1) * fused.d_out)
        fused.qkv.weight[rows] = torch.cat([getattr(head, name).weight for head in heads])
        if fused.qkv.bias is not None:
            fused.qkv.bias[rows] = torch.cat([getattr(head, name).bias for head in heads])
    fused.out_proj.weight.copy_(torch.eye(fused.d_out))
    if fused.out_proj.bias is not None:
        fused.out_proj.bias.zero_()


def _head_dim(d_out: int, num_heads: int) -> int:
    if num_heads <= 0 or d_out % num_heads:
        raise ValueError(
            f"d_out ({d_out}) must be divisible by num_heads ({num_heads}): each head gets "
            "d_out / num_heads dimensions."
        )
    return d_out // num_heads
