"""The attention ladder: each step checked by hand, against the next step, and for causality."""

import math

import pytest
import torch
from torch import nn

from llm.attention import (
    CausalAttention,
    KVCache,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttention,
    copy_wrapper_into_fused,
    simple_self_attention,
)
from llm.inspect import TOY_INPUTS as INPUTS  # the six-token example of the design notes


def hand_context_vector(inputs: torch.Tensor, query: int) -> list[float]:
    """Step 1 with explicit loops and no tensor algebra."""
    rows = inputs.tolist()
    scores = [sum(a * b for a, b in zip(rows[query], row, strict=True)) for row in rows]
    total = sum(math.exp(score) for score in scores)
    weights = [math.exp(score) / total for score in scores]
    return [sum(w * row[d] for w, row in zip(weights, rows, strict=True)) for d in range(3)]


def causal_steps(d: int = 8, context_length: int = 10) -> dict[str, nn.Module]:
    return {
        "causal": CausalAttention(d, d, context_length, dropout=0.0),
        "wrapper": MultiHeadAttentionWrapper(d, d, context_length, dropout=0.0, num_heads=2),
        "fused": MultiHeadAttention(d, d, context_length, dropout=0.0, num_heads=2),
    }


# --- Step 1 ---------------------------------------------------------------------------------


def test_simple_self_attention_third_token_matches_hand_computation():
    context = simple_self_attention(INPUTS)
    assert torch.allclose(context[2], torch.tensor(hand_context_vector(INPUTS, 2)), atol=1e-6)


def test_simple_self_attention_all_tokens_match_hand_computation():
    expected = torch.tensor([hand_context_vector(INPUTS, i) for i in range(6)])
    context, weights = simple_self_attention(INPUTS, return_weights=True)
    assert torch.allclose(context, expected, atol=1e-6)
    assert torch.allclose(weights.sum(-1), torch.ones(6))


def test_simple_self_attention_batched_equals_unbatched():
    batch = torch.stack([INPUTS, INPUTS.flip(0)])
    context = simple_self_attention(batch)
    assert context.shape == (2, 6, 3)
    assert torch.allclose(context[0], simple_self_attention(INPUTS))
    assert torch.allclose(context[1], simple_self_attention(INPUTS.flip(0)))


# --- Steps 2 and 3 --------------------------------------------------------------------------


def test_self_attention_scales_scores_by_sqrt_dk():
    torch.manual_seed(0)
    attn = SelfAttention(3, 4)
    context, weights = attn(INPUTS, return_weights=True)
    queries, keys, values = attn.W_query(INPUTS), attn.W_key(INPUTS), attn.W_value(INPUTS)
    expected = torch.softmax(queries @ keys.T / 2.0, dim=-1)  # sqrt(d_k) = sqrt(4) = 2
    assert torch.allclose(weights, expected)
    assert torch.allclose(context, expected @ values)


def test_causal_attention_is_self_attention_with_future_hidden():
    torch.manual_seed(0)
    plain = SelfAttention(3, 4)
    causal = CausalAttention(3, 4, context_length=6, dropout=0.0)
    causal.load_state_dict(plain.state_dict())
    _, full = plain(INPUTS, return_weights=True)
    _, masked = causal(INPUTS.unsqueeze(0), return_weights=True)
    expected = full.tril() / full.tril().sum(-1, keepdim=True)  # renormalise the visible part
    assert torch.allclose(masked[0], expected, atol=1e-6)


@pytest.mark.parametrize("step", ["causal", "wrapper", "fused"])
def test_future_tokens_never_change_past_outputs(step):
    torch.manual_seed(0)
    attn = causal_steps()[step]
    x = torch.randn(2, 10, 8)
    for t in range(10):
        changed = x.clone()
        changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
        assert torch.allclose(attn(x)[:, : t + 1], attn(changed)[:, : t + 1], atol=1e-6)


@pytest.mark.parametrize("step", ["causal", "wrapper", "fused"])
def test_causal_weights_rows_sum_to_one_and_upper_triangle_is_zero(step):
    torch.manual_seed(0)
    _, weights = causal_steps()[step](torch.randn(2, 7, 8), return_weights=True)
    assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-6)
    assert torch.all(weights.triu(diagonal=1) == 0)


# --- Steps 4 and 5 --------------------------------------------------------------------------


@pytest.mark.parametrize("num_heads", [1, 2, 3, 6])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_wrapper_equals_fused_module(num_heads, qkv_bias):
    torch.manual_seed(num_heads)
    d_in, d_out, context_length = 5, 12, 9
    wrapper = MultiHeadAttentionWrapper(d_in, d_out, context_length, 0.0, num_heads, qkv_bias)
    fused = MultiHeadAttention(d_in, d_out, context_length, 0.0, num_heads, qkv_bias)
    copy_wrapper_into_fused(wrapper, fused)
    x = torch.randn(3, context_length, d_in)
    wrapper_out, wrapper_weights = wrapper(x, return_weights=True)
    fused_out, fused_weights = fused(x, return_weights=True)
    assert torch.allclose(wrapper_out, fused_out, atol=1e-5)
    assert torch.allclose(wrapper_weights, fused_weights, atol=1e-5)
    assert torch.allclose(wrapper_out, fused(x), atol=1e-5)  # the SDPA path too


def test_fused_sdpa_path_equals_explicit_softmax_path():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 16, context_length=12, dropout=0.0, num_heads=4, qkv_bias=True)
    x = torch.randn(2, 12, 16)
    explicit_out, weights = attn(x, return_weights=True)
    assert torch.allclose(attn(x), explicit_out, atol=1e-6)
    # Rebuild both from the projections by hand: weights first, then the SDPA output from them.
    queries, keys, values = attn.qkv(x).view(2, 12, 3, 4, 4).permute(2, 0, 3, 1, 4)
    future = torch.ones(12, 12, dtype=torch.bool).triu(1)
    scores = (queries @ keys.transpose(-2, -1) / 2.0).masked_fill(future, float("-inf"))
    reference = torch.softmax(scores, dim=-1)  # (B, nh, T, T), head size 4 -> sqrt(4) = 2
    assert torch.allclose(weights, reference, atol=1e-6)
    by_hand = attn.out_proj((reference @ values).transpose(1, 2).reshape(2, 12, 16))
    assert torch.allclose(attn(x), by_hand, atol=1e-6)


def test_fused_module_equals_torch_multihead_attention():
    torch.manual_seed(0)
    d, num_heads, T = 16, 4, 10
    ours = MultiHeadAttention(d, d, T, dropout=0.0, num_heads=num_heads, qkv_bias=True)
    theirs = nn.MultiheadAttention(d, num_heads, bias=True, batch_first=True)
    with torch.no_grad():
        theirs.in_proj_weight.copy_(ours.qkv.weight)  # both stack q, k, v rows in that order
        theirs.in_proj_bias.copy_(ours.qkv.bias)
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        theirs.out_proj.bias.copy_(ours.out_proj.bias)
    x = torch.randn(3, T, d)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)  # True = not allowed, torch's convention
    expected, expected_weights = theirs(x, x, x, attn_mask=future, average_attn_weights=False)
    out, weights = ours(x, return_weights=True)
    assert torch.allclose(ours(x), expected, atol=1e-5)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(weights, expected_weights, atol=1e-5)


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 1, 5], [12]])
def test_kv_cache_token_by_token_equals_full_forward(chunks):
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 16, context_length=12, dropout=0.0, num_heads=4).eval()
    x = torch.randn(2, 12, 16)
    cache, outputs, start = KVCache(max_length=12), [], 0
    for size in chunks:
        outputs.append(attn(x[:, start : start + size], kv_cache=cache))
        start += size
    assert cache.length == 12
    assert torch.allclose(torch.cat(outputs, dim=1), attn(x), atol=1e-5)


def test_kv_cache_refuses_to_overflow():
    attn = MultiHeadAttention(8, 8, context_length=4, dropout=0.0, num_heads=2)
    cache = KVCache(max_length=4)
    attn(torch.randn(1, 3, 8), kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache is full"):
        attn(torch.randn(1, 2, 8), kv_cache=cache)


def test_inputs_and_settings_the_steps_cannot_use_are_refused_in_one_line():
    with pytest.raises(ValueError, match="6 tokens do not fit the context_length of 4"):
        CausalAttention(8, 4, context_length=4, dropout=0.0)(torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match=r"Inputs must be batched, \(B, T, d_in\), got \(6, 8\)"):
        MultiHeadAttention(8, 8, 6, 0.0, num_heads=2)(torch.randn(6, 8))
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\), got -1.0"):
        MultiHeadAttention(8, 8, 6, -1.0, num_heads=2)
    with pytest.raises(ValueError, match="max_length must be a positive whole number"):
        KVCache(max_length=-1)


@pytest.mark.parametrize(
    "fused",
    [
        MultiHeadAttention(8, 8, 6, 0.0, num_heads=4),  # other head count
        MultiHeadAttention(8, 8, 6, 0.0, num_heads=2, qkv_bias=True),  # biases the wrapper lacks
        MultiHeadAttention(8, 4, 6, 0.0, num_heads=2),  # another d_out
    ],
)
def test_copying_between_unlike_modules_is_refused(fused):
    wrapper = MultiHeadAttentionWrapper(8, 8, 6, 0.0, num_heads=2)
    with pytest.raises(ValueError, match=r"Cannot copy a wrapper of \(d_in, d_out, heads\)"):
        copy_wrapper_into_fused(wrapper, fused)


@pytest.mark.parametrize("step", ["causal", "wrapper", "fused"])
def test_dropout_only_acts_in_training(step):
    torch.manual_seed(0)
    d, T = 8, 10
    attn = {
        "causal": CausalAttention(d, d, T, dropout=0.5),
        "wrapper": MultiHeadAttentionWrapper(d, d, T, dropout=0.5, num_heads=2),
        "fused": MultiHeadAttention(d, d, T, dropout=0.5, num_heads=2),
    }[step]
    x = torch.randn(2, T, d)
    attn.eval()
    assert torch.equal(attn(x), attn(x))
    attn.train()
    assert not torch.allclose(attn(x), attn(x))
    if step == "fused":  # the path that also returns the weights (for inspection) drops too
        assert not torch.allclose(attn(x, return_weights=True)[0], attn(x, return_weights=True)[0])


def test_fused_module_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    attn = MultiHeadAttention(6, 6, context_length=5, dropout=0.0, num_heads=2, qkv_bias=True)
    attn = attn.double()
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(attn, (x,))


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiHeadAttention(8, 10, context_length=4, dropout=0.0, num_heads=3)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiHeadAttentionWrapper(8, 10, context_length=4, dropout=0.0, num_heads=4)
