"""Attention, built up step by step.

Each step adds one idea to the step above it:

1. ``simple_self_attention``: context vectors as softmax-weighted sums of the inputs, no weights.
2. ``SelfAttention``: trainable query, key and value projections and 1/sqrt(d_k) scaling.
3. ``CausalAttention``: a causal mask hides future tokens; dropout on the attention weights.
4. ``MultiHeadAttentionWrapper``: several causal heads side by side, outputs concatenated.
5. ``MultiHeadAttention``: the same computation as one fused module, running on
   ``F.scaled_dot_product_attention``, with an output projection and a key/value cache.
   This is the module the GPT in ``llm.model`` uses by default (GPT-2).
6. ``GroupedQueryAttention``: fewer key/value heads than query heads, each shared by a group.
7. ``RotaryAttention``: queries and keys rotated by position (RoPE) instead of learned
   position embeddings.
8. ``SlidingWindowAttention``: each token attends to at most the last ``window`` tokens.

Steps 5 to 8 share one forward: step 6 makes fewer key/value heads, and steps 7 and 8 each
override one small method of it. The GPT uses the simplest step its config needs
(``llm.model.attention_for``).

Every step can return its attention weights (``return_weights=True``) so that the ladder can
be inspected side by side. Shapes: B batch, T tokens, S key positions (T plus any cached
ones), nh heads, nkv key/value heads, hs head size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.values import is_positive_finite, is_positive_integer, is_probability_below_one

if TYPE_CHECKING:  # imported where first used: FlexAttention imports torch.compile's machinery
    from torch.nn.attention.flex_attention import BlockMask

AttentionOutput = Tensor | tuple[Tensor, Tensor]


def causal_mask(
    num_queries: int,
    num_keys: int,
    device: torch.device | None = None,
    window: int | None = None,
) -> Tensor:
    """Boolean (T, S) mask, True where a query may attend to a key.

    The T queries are the last T of the S positions, so query i sits at position S - T + i and
    sees keys 0 .. S - T + i. With T == S this is the usual lower triangle. A ``window`` also
    hides keys ``window`` or more positions back, leaving a band: keys S - T + i - window + 1
    .. S - T + i.
    """
    ones = torch.ones(num_queries, num_keys, dtype=torch.bool, device=device)
    mask = ones.tril(diagonal=num_keys - num_queries)
    if window is not None:
        mask &= ~ones.tril(diagonal=num_keys - num_queries - window)
    return mask


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
        num_tokens, context_length = queries.size(-2), self.mask.size(0)
        if num_tokens > context_length:
            raise ValueError(
                f"{num_tokens} tokens do not fit the context_length of {context_length}: crop the "
                "input or make the module with a longer context_length."
            )
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

    It stores keys as the attention made them: with grouped-query attention (step 6) only the
    nkv key/value heads, and with RoPE (step 7) keys already rotated at their true positions.

    With a ``window`` (sliding-window attention, step 8) no query looks back ``window`` or more
    positions, so only the last ``window - 1`` are kept, in position order: each append returns
    them followed by the new ones and keeps the last ``window - 1`` of those (a copy of at most
    ``window - 1`` positions per call). Memory stays bounded by the window however long the
    text; ``length`` still counts every position seen, and ``max_length`` still bounds it.
    """

    def __init__(self, max_length: int, window: int | None = None) -> None:
        _check_positive("max_length", max_length)
        if window is not None:
            _check_positive("window", window)
        self.max_length = max_length
        self.window = window
        self.length = 0
        self.keys: Tensor | None = None  # (B, nkv, max_length or window - 1, hs) once allocated
        self.values: Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes the stored keys and values take."""
        stored = (t for t in (self.keys, self.values) if t is not None)
        return sum(t.numel() * t.element_size() for t in stored)

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store (B, nkv, T, hs) new keys and values; return every (B, nkv, S, hs) one the new
        queries may attend to, the new ones last: all so far, or those within the window."""
        if self.keys is not None and keys.shape[:2] + keys.shape[3:] != (
            self.keys.shape[:2] + self.keys.shape[3:]
        ):
            raise ValueError(
                f"KV cache holds keys of shape {tuple(self.keys.shape)} (B, nkv, S, hs), got "
                f"{tuple(keys.shape)}: use one cache per layer and batch (new_kv_caches())."
            )
        end = self.length + keys.size(2)
        if end > self.max_length:
            raise ValueError(
                f"KV cache is full: {end} positions do not fit its {self.max_length}; "
                "start a new cache or crop the input."
            )
        if self.window is not None:
            return self._append_within_window(keys, values, end, self.window)
        if self.keys is None or self.values is None:
            B, nkv, _, hs = keys.shape
            self.keys = keys.new_zeros(B, nkv, self.max_length, hs)
            self.values = values.new_zeros(B, nkv, self.max_length, hs)
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def _append_within_window(
        self, keys: Tensor, values: Tensor, end: int, window: int
    ) -> tuple[Tensor, Tensor]:
        if self.keys is not None and self.values is not None:
            keys = torch.cat([self.keys, keys], dim=2)  # (B, nkv, kept + T, hs)
            values = torch.cat([self.values, values], dim=2)
        first_kept = max(0, keys.size(2) - (window - 1))
        self.keys = keys[:, :, first_kept:].clone()  # a copy: the rest can be freed
        self.values = values[:, :, first_kept:].clone()
        self.length = end
        return keys, values


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

    The forward runs in small methods, so that one forward serves the next steps of the ladder
    too: ``split_heads`` splits by ``num_kv_heads``, which step 6 lowers (its projection makes
    fewer key/value heads); step 7 overrides ``rotate`` (rotating by position) and step 8
    ``attention_mask`` and ``attend`` (limiting the keys).
    """

    window: int | None = None  # the keys a query sees, its own included (step 8); None: all

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
        if not is_probability_below_one(dropout):
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}.")
        self.d_out = d_out
        self.num_heads = num_heads
        self.num_kv_heads = num_heads  # every query head has its own key and value head
        self.context_length = context_length
        self.dropout = dropout
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out, bias=proj_bias)

    def forward(
        self, x: Tensor, kv_cache: KVCache | None = None, return_weights: bool = False
    ) -> AttentionOutput:
        if x.dim() != 3:
            raise ValueError(f"Inputs must be batched, (B, T, d_in), got {tuple(x.shape)}.")
        B, T, _ = x.shape
        queries, keys, values = self.split_heads(self.qkv(x))  # (B, nh, T, hs), 2×(B, nkv, T, hs)
        start = 0 if kv_cache is None else kv_cache.length  # position of the first new token
        queries, keys = self.rotate(queries, keys, start)
        if kv_cache is not None:
            if kv_cache.window is not None and kv_cache.window < (self.window or math.inf):
                sees = "every key" if self.window is None else f"window={self.window}"
                raise ValueError(
                    f"a KVCache with window={kv_cache.window} drops keys this layer attends to "
                    f"({sees}): give it the layer's window, as GPT.new_kv_caches() does"
                )
            keys, values = kv_cache.append(keys, values)  # (B, nkv, S, hs)
        dropout_p = self.dropout if self.training else 0.0

        if return_weights:
            group = self.num_heads // self.num_kv_heads  # query heads per key/value head
            keys = keys.repeat_interleave(group, dim=1)  # (B, nh, S, hs)
            values = values.repeat_interleave(group, dim=1)
            mask = self.attention_mask(T, keys.size(2), x.device)  # (T, S), or None: causal
            explicit = causal_mask(T, T, x.device) if mask is None else mask
            weights = scaled_attention_weights(queries, keys, explicit)  # (B, nh, T, S)
            context = F.dropout(weights, dropout_p) @ values  # (B, nh, T, hs)
        else:
            context = self.attend(queries, keys, values, dropout_p)  # (B, nh, T, hs)
        context = context.transpose(1, 2).reshape(B, T, self.d_out)  # heads side by side again
        output = self.out_proj(context)  # (B, T, d_out)
        return (output, weights) if return_weights else output

    def split_heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Fused projections (B, T, (nh + 2·nkv)·hs) -> queries (B, nh, T, hs), keys and values
        (B, nkv, T, hs). The projection stacks every query head, then the keys, then the values;
        here nkv == nh."""
        B, T, _ = qkv.shape
        kv_width = self.num_kv_heads * self.head_dim
        parts = qkv.split([self.d_out, kv_width, kv_width], dim=-1)
        queries, keys, values = (p.view(B, T, -1, self.head_dim).transpose(1, 2) for p in parts)
        return queries, keys, values

    def rotate(self, queries: Tensor, keys: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Position information for queries and keys (B, n, T, hs) of the tokens at positions
        ``start`` .. ``start + T - 1``: none here, since the GPT adds learned position
        embeddings to its input; step 7 rotates them."""
        return queries, keys

    def attention_mask(
        self, num_queries: int, num_keys: int, device: torch.device
    ) -> Tensor | None:
        """The (T, S) mask of the keys each query may see, or None for the plain causal mask of
        a whole sequence (T == S), which SDPA applies itself (``is_causal``) without building
        it. Queries that follow cached keys sit at positions S - T .. S - 1 and need the mask."""
        if num_queries == num_keys:
            return None
        return causal_mask(num_queries, num_keys, device)

    def attend(self, queries: Tensor, keys: Tensor, values: Tensor, dropout_p: float) -> Tensor:
        """SDPA of queries (B, nh, T, hs) over keys and values (B, nkv, S, hs) -> (B, nh, T, hs),
        under ``attention_mask``. With fewer key/value heads (step 6), ``enable_gqa`` lets each
        group of query heads read its shared head without copying it."""
        mask = self.attention_mask(queries.size(2), keys.size(2), queries.device)  # (T, S)
        return F.scaled_dot_product_attention(
            queries,
            keys,
            values,
            attn_mask=mask,
            dropout_p=dropout_p,
            is_causal=mask is None,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )


# --- Step 6 ---------------------------------------------------------------------------------


class GroupedQueryAttention(MultiHeadAttention):
    """Adds key/value heads shared by groups of query heads: grouped-query attention (GQA).

    ``num_kv_heads`` key and value heads serve the ``num_heads`` query heads: query heads
    g·k .. g·k + g - 1 (g = num_heads / num_kv_heads) all read key/value head k.
    ``num_kv_heads == num_heads`` is multi-head attention; ``num_kv_heads == 1`` is multi-query
    attention (MQA). The fused projection makes nh query heads but only nkv key and value heads,
    so the KV cache, and the memory each decoded token reads from it, shrink by the factor g,
    for a small loss of quality. SDPA runs it natively (``enable_gqa``); the explicit
    ``return_weights`` path repeats each key/value head for its group. The weights have one
    map per query head: (B, nh, T, S).
    """

    def __init__(self, *args: Any, num_kv_heads: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        num_kv_heads = self.num_heads if num_kv_heads is None else num_kv_heads
        if not is_positive_integer(num_kv_heads) or self.num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads "
                f"({num_kv_heads}): each key/value head serves a group of query heads."
            )
        self.num_kv_heads = num_kv_heads
        # Queries keep their d_out rows; keys and values shrink to nkv heads each.
        width = self.d_out + 2 * num_kv_heads * self.head_dim
        self.qkv = nn.Linear(self.qkv.in_features, width, bias=self.qkv.bias is not None)


# --- Step 7 ---------------------------------------------------------------------------------


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE): rotates pairs of a head's dimensions by position.

    Dimension i is paired with i + hs/2 (the "rotate half" layout of GPT-NeoX and Llama), and
    the pair at position m turns by the angle m·θ_i, θ_i = rope_theta^(-2i/hs): the first pairs
    fast, the last slowly. A rotation keeps vector norms, and rotating a query at m and a key at
    n gives q·k of the unrotated vectors with a rotation by n - m between them, so scores depend
    on the distance only. The cos/sin of every angle up to ``max_positions`` are a
    non-persistent buffer: derived from the config, never saved.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(
                f"RoPE rotates pairs of dimensions: head size {head_dim} (d_out / num_heads) is "
                "odd; choose sizes that make it even"
            )
        _check_positive("max_positions", max_positions)
        if not is_positive_finite(theta):
            raise ValueError(f"RoPE's theta must be a positive finite number, got {theta!r}.")
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self.register_buffer("cos", torch.empty(0), persistent=False)  # (max_positions, hs/2)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Compute the cos/sin tables (again, after building the module on the meta device)."""
        half = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device="cpu")
        inverse_frequency = self.theta ** (-half / self.head_dim)  # (hs/2,) θ_i
        positions = torch.arange(self.max_positions, dtype=torch.float64, device="cpu")
        angles = torch.outer(positions, inverse_frequency)  # (max_positions, hs/2)
        device = None if self.cos.is_meta else self.cos.device
        self.cos = angles.cos().float().to(device)
        self.sin = angles.sin().float().to(device)

    def forward(self, x: Tensor, start: int = 0) -> Tensor:
        """x (..., T, hs) at positions start .. start + T - 1 -> rotated, same shape."""
        T = x.size(-2)
        if start < 0:
            raise ValueError(f"RoPE positions start at 0 or later, got start={start}.")
        if start + T > self.max_positions:
            raise ValueError(
                f"RoPE position {start + T - 1} is past the {self.max_positions} positions "
                "it was built for."
            )
        cos = self.cos[start : start + T].to(x.dtype)  # (T, hs/2)
        sin = self.sin[start : start + T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)  # (..., T, hs/2): the first and second member of each pair
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class RotaryAttention(GroupedQueryAttention):
    """Adds rotary position embeddings: queries and keys are rotated by their position.

    GPT-2 adds a learned vector per position to each token before the first layer; RoPE instead
    rotates every query and key, in every layer, by angles proportional to the position (see
    ``RotaryEmbedding``), so attention scores see relative distances and there are no position
    parameters. Values are not rotated. With a KV cache, new tokens are rotated at their true
    positions (``start``, the cache's length) before their keys are stored, so cached keys are
    never touched again. ``rope_theta`` is the base of the angle frequencies (10000 as in
    RoFormer; long-context models raise it); ``None`` keeps queries and keys unrotated, for a
    model that keeps learned position embeddings but uses the other steps.
    """

    def __init__(self, *args: Any, rope_theta: float | None = 10000.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rope = (
            None
            if rope_theta is None
            else RotaryEmbedding(self.head_dim, self.context_length, rope_theta)
        )

    def rotate(self, queries: Tensor, keys: Tensor, start: int) -> tuple[Tensor, Tensor]:
        if self.rope is None:
            return queries, keys
        return self.rope(queries, start), self.rope(keys, start)  # shapes unchanged


# --- Step 8 ---------------------------------------------------------------------------------


class SlidingWindowAttention(RotaryAttention):
    """Adds a sliding window: each token attends to at most the last ``window`` tokens.

    The causal mask becomes a band: query t sees keys t - window + 1 .. t. Attention then costs
    O(T·window) instead of O(T²), and a KV cache built with ``KVCache(window=...)`` keeps only
    the last ``window - 1`` positions, so generation memory stays bounded however long the text.
    Stacked layers still pass information further back: after L layers a token can be
    influenced by tokens up to L·(window - 1) positions back (Mistral's argument).

    SDPA with a boolean band mask still computes every score and then hides most of them.
    FlexAttention skips the blocks that lie wholly outside the band; it runs a whole sequence
    (no cache, no dropout) where ``use_flex`` is True, or, by default (None), on CUDA for
    sequences of at least ``FLEX_MIN_WINDOWS`` windows: on an H200, forward and backward at
    window 256, it lost to SDPA at 1024 tokens and won by 2.4x at 4096. It needs
    ``torch.compile`` and, on a CPU, computes no gradients, so CPU training uses SDPA.
    """

    FLEX_MIN_WINDOWS = 8

    def __init__(
        self, *args: Any, window: int, use_flex: bool | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        _check_positive("window", window)
        self.window = window
        self.use_flex = use_flex

    def attention_mask(
        self, num_queries: int, num_keys: int, device: torch.device
    ) -> Tensor | None:
        if num_keys <= self.window:  # every key is within reach: the band hides nothing more
            return super().attention_mask(num_queries, num_keys, device)
        return causal_mask(num_queries, num_keys, device, window=self.window)

    def attend(self, queries: Tensor, keys: Tensor, values: Tensor, dropout_p: float) -> Tensor:
        # FlexAttention takes a whole sequence longer than the window, and builds no mask.
        num_queries, num_keys = queries.size(2), keys.size(2)
        whole_band = num_queries == num_keys > self.window and dropout_p == 0.0
        use_flex = self.use_flex
        if use_flex is None:
            use_flex = queries.is_cuda and num_keys >= self.FLEX_MIN_WINDOWS * self.window
        if whole_band and use_flex:
            needs_gradients = torch.is_grad_enabled() and queries.requires_grad
            if needs_gradients and not queries.is_cuda:
                raise ValueError(
                    "use_flex=True: FlexAttention computes no gradients on a CPU; run the model "
                    "under torch.no_grad(), or leave use_flex None to train with SDPA"
                )
            # Outside any torch.compile'd graph (a graph break): traced into the model's graph,
            # torch 2.13's CPU kernel computed wrong outputs for rotated queries/keys. Wrapped
            # here, not at import: torch.compiler.disable imports torch.compile's machinery,
            # which took 3 s of generate.py's 6.5 s start on a 2-core CPU.
            outside_graphs = torch.compiler.disable(flex_band_attention)
            return outside_graphs(queries, keys, values, self.window)
        return super().attend(queries, keys, values, dropout_p)


def flex_band_attention(queries: Tensor, keys: Tensor, values: Tensor, window: int) -> Tensor:
    """Sliding-window causal attention of a whole sequence by compiled FlexAttention, which
    skips the (128 × 128) blocks outside the band (uncompiled, it would materialise every
    score). The block mask is cached per length. Shapes as ``MultiHeadAttention.attend``."""
    block_mask = _band_block_mask(window, queries.size(2), str(queries.device))
    enable_gqa = keys.size(1) != queries.size(1)
    return _compiled_flex_attention()(
        queries, keys, values, block_mask=block_mask, enable_gqa=enable_gqa
    )


@functools.cache
def _compiled_flex_attention() -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=16)
def _band_block_mask(window: int, length: int, device: str) -> BlockMask:
    from torch.nn.attention.flex_attention import create_block_mask

    def band(batch: Tensor, head: Tensor, query: Tensor, key: Tensor) -> Tensor:
        return (key <= query) & (query - key < window)

    return create_block_mask(band, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)


@torch.no_grad()
def copy_wrapper_into_fused(wrapper: MultiHeadAttentionWrapper, fused: MultiHeadAttention) -> None:
    """Give ``fused`` the wrapper's heads, so that both compute the same attention weights.

    The fused projection stacks every head's query rows, then every head's key rows, then the
    value rows. The wrapper has no output projection, so the fused one becomes the identity.
    Modules of other sizes, head counts or biases raise a ValueError: no copy could make them
    equal.
    """
    heads = wrapper.heads
    first = heads[0].W_query
    wrapper_shape = (first.in_features, first.out_features * len(heads), len(heads))
    fused_shape = (fused.qkv.in_features, fused.d_out, fused.num_heads)
    if (
        wrapper_shape != fused_shape
        or fused.num_kv_heads != fused.num_heads
        or (first.bias is None) != (fused.qkv.bias is None)
    ):
        raise ValueError(
            f"Cannot copy a wrapper of (d_in, d_out, heads) {wrapper_shape} "
            f"{'with' if first.bias is not None else 'without'} qkv biases into a fused module "
            f"of {fused_shape} ({fused.num_kv_heads} key/value heads) "
            f"{'with' if fused.qkv.bias is not None else 'without'}: make them alike."
        )
    for part, name in enumerate(("W_query", "W_key", "W_value")):
        rows = slice(part * fused.d_out, (part + 1) * fused.d_out)
        fused.qkv.weight[rows] = torch.cat([getattr(head, name).weight for head in heads])
        if fused.qkv.bias is not None:
            fused.qkv.bias[rows] = torch.cat([getattr(head, name).bias for head in heads])
    fused.out_proj.weight.copy_(torch.eye(fused.d_out))
    if fused.out_proj.bias is not None:
        fused.out_proj.bias.zero_()


def _check_positive(name: str, value: object) -> None:
    if not is_positive_integer(value):
        raise ValueError(f"{name} must be a positive whole number of tokens, got {value!r}.")


def _head_dim(d_out: int, num_heads: int) -> int:
    if not is_positive_integer(num_heads) or d_out % num_heads:
        raise ValueError(
            f"d_out ({d_out}) must be divisible by num_heads ({num_heads}): each head gets "
            "d_out / num_heads dimensions."
        )
    return d_out // num_heads
