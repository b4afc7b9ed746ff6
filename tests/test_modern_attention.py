"""Steps 6-8 of the attention ladder (grouped-query attention, RoPE, sliding windows) and the
GPT options built on them: equivalences, invariances, the KV cache, files and training."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import compose_run, tiny_overrides
from torch import Tensor

from llm.attention import (
    GroupedQueryAttention,
    KVCache,
    MultiHeadAttention,
    RotaryAttention,
    RotaryEmbedding,
    SlidingWindowAttention,
)
from llm.checkpoint import load_model, save_hf, save_model
from llm.generate import generate_tokens
from llm.model import GPT, PRESETS, GPTConfig
from llm.run import train
from llm.training import GPTLightningModule

D, HEADS, T = 32, 4, 12  # module tests: width, query heads, tokens (head size 8)
BYTES = {"name": "bytes", "path": None}

# Every option of the GPT and mixes of them (n_layer=2, n_head=4, context_length=16).
OPTIONS = {
    "gpt2": {},
    "gqa": {"n_kv_head": 2},
    "mqa": {"n_kv_head": 1},
    "rope": {"pos_embedding": "rope"},
    "window": {"sliding_window": 5},
    "window per layer": {"sliding_window": [3, None]},
    "rope+gqa": {"pos_embedding": "rope", "n_kv_head": 2},
    "learned+mqa+window": {"n_kv_head": 1, "sliding_window": 4},
    "rope+mqa+windows": {"pos_embedding": "rope", "n_kv_head": 1, "sliding_window": [4, 7]},
}


def tiny_config(**options: object) -> GPTConfig:
    fields = dict(vocab_size=100, context_length=16, n_layer=2, n_head=HEADS, n_embd=D)
    return GPTConfig(**(fields | options))


def tiny_gpt(**options: object) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config(**options)).eval()


def module(step: type[MultiHeadAttention], **options: object) -> MultiHeadAttention:
    torch.manual_seed(0)
    return step(D, D, context_length=16, dropout=0.0, num_heads=HEADS, qkv_bias=True, **options)


@torch.no_grad()
def repeated_into_multi_head(gqa: GroupedQueryAttention) -> MultiHeadAttention:
    """The multi-head module whose key/value heads are ``gqa``'s, each repeated for its group."""
    mha = module(MultiHeadAttention).eval()
    group, hs = gqa.num_heads // gqa.num_kv_heads, gqa.head_dim
    q, k, v = gqa.qkv.weight.split([D, gqa.num_kv_heads * hs, gqa.num_kv_heads * hs])
    qb, kb, vb = gqa.qkv.bias.split([D, gqa.num_kv_heads * hs, gqa.num_kv_heads * hs])
    repeat = lambda t: t.unflatten(0, (gqa.num_kv_heads, hs)).repeat_interleave(group, 0)
    mha.qkv.weight.copy_(torch.cat([q, repeat(k).flatten(0, 1), repeat(v).flatten(0, 1)]))
    mha.qkv.bias.copy_(torch.cat([qb, repeat(kb).flatten(0, 1), repeat(vb).flatten(0, 1)]))
    mha.out_proj.load_state_dict(gqa.out_proj.state_dict())
    return mha


# --- Step 6: grouped-query attention --------------------------------------------------------


def test_gqa_with_as_many_kv_heads_as_heads_equals_multi_head_attention():
    mha = module(MultiHeadAttention).eval()
    gqa = module(GroupedQueryAttention, num_kv_heads=HEADS).eval()
    gqa.load_state_dict(mha.state_dict())  # the same names and shapes
    x = torch.randn(2, T, D)
    out, weights = gqa(x, return_weights=True)
    expected, expected_weights = mha(x, return_weights=True)
    assert torch.allclose(gqa(x), mha(x), atol=1e-6)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(weights, expected_weights, atol=1e-6)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_gqa_equals_multi_head_attention_with_the_kv_heads_repeated(num_kv_heads):
    gqa = module(GroupedQueryAttention, num_kv_heads=num_kv_heads).eval()
    assert gqa.qkv.weight.shape == (D + 2 * num_kv_heads * 8, D)  # fewer key/value rows
    mha = repeated_into_multi_head(gqa)
    x = torch.randn(3, T, D)
    out, weights = gqa(x, return_weights=True)
    expected, expected_weights = mha(x, return_weights=True)
    assert torch.allclose(gqa(x), mha(x), atol=1e-5)  # the SDPA path
    assert torch.allclose(out, expected, atol=1e-5)  # the explicit path
    assert torch.allclose(weights, expected_weights, atol=1e-5)
    assert weights.shape == (3, HEADS, T, T)  # one map per query head
    # Not a vacuous equality: query heads in different groups attend differently.
    if num_kv_heads == 2:
        assert not torch.allclose(weights[:, 0], weights[:, 2], atol=1e-3)


def test_gqa_kv_cache_stores_only_the_kv_heads():
    gqa = module(GroupedQueryAttention, num_kv_heads=1).eval()
    cache = KVCache(max_length=16)
    gqa(torch.randn(2, 5, D), kv_cache=cache)
    assert cache.keys.shape == (2, 1, 16, 8) and cache.values.shape == (2, 1, 16, 8)
    full = KVCache(max_length=16)
    module(MultiHeadAttention)(torch.randn(2, 5, D), kv_cache=full)
    assert cache.nbytes * HEADS == full.nbytes


def test_heads_must_divide_into_kv_heads():
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be divisible by num_kv_heads"):
        module(GroupedQueryAttention, num_kv_heads=3)


# --- Step 7: rotary position embeddings -----------------------------------------------------


def test_rope_preserves_norms_and_position_zero_is_identity():
    rope = RotaryEmbedding(head_dim=8, max_positions=64)
    x = torch.randn(2, 3, 64, 8)
    rotated = rope(x)
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.equal(rotated[..., 0, :], x[..., 0, :])  # position 0: angle 0
    assert not torch.allclose(rotated[..., 1:, :], x[..., 1:, :])  # later positions do turn


def test_rope_refuses_positions_past_its_table():
    rope = RotaryEmbedding(head_dim=4, max_positions=8)
    assert rope(torch.randn(1, 8, 4)).shape == (1, 8, 4)  # every position it was built for
    assert rope(torch.randn(1, 1, 4), start=7).shape == (1, 1, 4)
    with pytest.raises(ValueError, match="RoPE position 8 is past the 8 positions"):
        rope(torch.randn(1, 1, 4), start=8)
    with pytest.raises(ValueError, match="RoPE positions start at 0 or later, got start=-2"):
        rope(torch.randn(1, 1, 4), start=-2)
    for theta in (0.0, -5.0, math.inf):
        with pytest.raises(ValueError, match="RoPE's theta must be a positive finite number"):
            RotaryEmbedding(head_dim=4, max_positions=8, theta=theta)
    with pytest.raises(ValueError, match="window must be a positive whole number of tokens"):
        SlidingWindowAttention(8, 8, 6, 0.0, 2, window=2.5)


def test_rope_rotates_each_pair_by_position_times_its_frequency():
    rope = RotaryEmbedding(head_dim=4, max_positions=8, theta=100.0)
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # pair 0 = (1, 0), pair 1 = (0, 1)
    rotated = rope(x, start=3)  # one token at position 3
    angles = [3 * 100.0 ** (-0 / 4), 3 * 100.0 ** (-2 / 4)]  # θ_i = theta^(-2i/hs)
    expected = [math.cos(angles[0]), -math.sin(angles[1]), math.sin(angles[0]), math.cos(angles[1])]
    assert torch.allclose(rotated[0], torch.tensor(expected), atol=1e-6)


def test_rope_scores_depend_only_on_the_distance():
    rope = RotaryEmbedding(head_dim=16, max_positions=128)
    q, k = torch.randn(16), torch.randn(16)

    def score(query_position: int, key_position: int) -> torch.Tensor:
        rotated_q = rope(q[None], start=query_position)[0]
        rotated_k = rope(k[None], start=key_position)[0]
        return rotated_q @ rotated_k

    for m, n in [(5, 2), (9, 9), (3, 11)]:
        for shift in (1, 17, 100):
            assert torch.allclose(score(m, n), score(m + shift, n + shift), atol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)  # the distance does matter


def test_rope_needs_an_even_head_size():
    with pytest.raises(ValueError, match=r"head size 7 \(d_out / num_heads\) is odd"):
        RotaryEmbedding(head_dim=7, max_positions=8)


# --- Step 8: sliding windows ----------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 3, 5])
def test_sliding_window_ignores_tokens_further_back_than_the_window(window):
    attn = module(SlidingWindowAttention, num_kv_heads=2, window=window).eval()
    x = torch.randn(2, T, D)
    for t in range(T):
        changed = x.clone()
        changed[:, : max(0, t - window + 1)] = torch.randn_like(
            changed[:, : max(0, t - window + 1)]
        )
        assert torch.allclose(attn(x)[:, t], attn(changed)[:, t], atol=1e-6)
        if t - window + 1 >= 0:  # the oldest token inside the window still counts
            inside = x.clone()
            inside[:, t - window + 1] += 1.0
            assert not torch.allclose(attn(x)[:, t], attn(inside)[:, t], atol=1e-4)


@pytest.mark.parametrize("window", [T, T + 5])
def test_a_window_of_at_least_the_sequence_equals_full_causal_attention(window):
    full = module(RotaryAttention, num_kv_heads=2).eval()
    windowed = module(SlidingWindowAttention, num_kv_heads=2, window=window).eval()
    windowed.load_state_dict(full.state_dict())
    x = torch.randn(2, T, D)
    assert torch.allclose(windowed(x), full(x), atol=1e-6)
    assert torch.allclose(windowed(x, return_weights=True)[1], full(x, return_weights=True)[1])


def test_sliding_window_weights_are_a_band():
    attn = module(SlidingWindowAttention, window=4).eval()
    _, weights = attn(torch.randn(1, T, D), return_weights=True)
    distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]  # query - key
    outside = (distance < 0) | (distance >= 4)
    assert torch.all(weights[..., outside] == 0)
    assert torch.all(weights[..., ~outside] > 0)
    assert torch.allclose(weights.sum(-1), torch.ones(1, HEADS, T), atol=1e-6)


def test_flex_attention_forced_on_a_cpu_refuses_to_compute_gradients():
    attn = module(SlidingWindowAttention, window=4, use_flex=True).eval()
    with pytest.raises(
        ValueError, match=r"no gradients on a CPU; run the model under torch\.no_grad\(\)"
    ):
        attn(torch.randn(1, T, D))


@torch.no_grad()
def test_flex_attention_kernel_equals_the_sdpa_band_mask():
    """FlexAttention (compiled; forward only on a CPU) is the CUDA default for whole-sequence
    windows; here it is forced on to check it computes what the SDPA band mask does, over
    several 128-token blocks, most of them outside the band, eagerly and in a compiled model."""
    torch.manual_seed(0)
    attn = SlidingWindowAttention(D, D, 300, 0.0, HEADS, num_kv_heads=2, window=5).eval()
    x = torch.randn(2, 300, D)
    reference = attn(x)  # the CPU default: SDPA with a boolean band mask
    attn.use_flex = True
    attn.attention_mask = None  # the kernel needs no (T, T) mask: building one would fail
    assert torch.allclose(attn(x), reference, atol=1e-5)

    # A compiled model calls the kernel between its graphs, never inside one: traced into a
    # model's graph, torch 2.13's CPU kernel gave outputs off by 0.2 for rotated queries/keys
    # (in processes that had not imported Lightning).
    graphs: list[torch.fx.GraphModule] = []

    def record(graph: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable:
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    assert torch.allclose(torch.compile(attn, backend=record)(x), reference, atol=1e-5)
    traced = [str(node.target) for graph in graphs for node in graph.graph.nodes]
    assert graphs and not any("flex" in target for target in traced), traced


# --- The KV cache, for every option ---------------------------------------------------------


@pytest.mark.parametrize("chunks", [[1] * 16, [5, 1, 1, 6, 3], [16]])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_kv_cache_token_by_token_and_chunked_equals_one_full_forward(name, chunks):
    model = tiny_gpt(**OPTIONS[name])
    idx = torch.randint(0, 100, (2, 16))
    caches, logits, start = model.new_kv_caches(), [], 0
    with torch.no_grad():
        full, _ = model(idx)
        for size in chunks:
            logits.append(model(idx[:, start : start + size], kv_caches=caches)[0])
            start += size
    assert torch.allclose(torch.cat(logits, dim=1), full, atol=1e-5)
    for cache, window in zip(caches, model.config.layer_windows, strict=True):
        assert cache.length == 16
        assert cache.keys.size(1) == model.config.kv_heads  # only the key/value heads
        if window is not None:  # bounded by the window: only the last window - 1 positions
            assert cache.keys.size(2) == window - 1 and cache.values.size(2) == window - 1


def test_window_cache_memory_stays_bounded_however_long_the_text():
    attn = module(SlidingWindowAttention, num_kv_heads=1, window=4).eval()
    cache = KVCache(max_length=16, window=4)
    sizes = []
    with torch.no_grad():
        for _ in range(16):
            attn(torch.randn(1, 1, D), kv_cache=cache)
            sizes.append(cache.nbytes)
    assert sizes[-1] == 3 * 2 * 8 * 4  # 3 positions, keys and values, head size 8, float32
    assert max(sizes) == sizes[-1] and sizes[0] < sizes[-1]


@pytest.mark.parametrize(
    ("layer_window", "too_narrow", "wide_enough"), [(None, 3, None), (4, 2, 9)]
)
def test_a_cache_that_keeps_less_than_the_layer_sees_is_refused(
    layer_window, too_narrow, wide_enough
):
    step = MultiHeadAttention if layer_window is None else SlidingWindowAttention
    attn = module(step, **({} if layer_window is None else {"window": layer_window})).eval()
    with pytest.raises(ValueError, match=f"window={too_narrow} drops keys this layer attends"):
        attn(torch.randn(1, 1, D), kv_cache=KVCache(max_length=16, window=too_narrow))
    assert attn(torch.randn(1, 1, D), kv_cache=KVCache(16, wide_enough)).shape == (1, 1, D)


@pytest.mark.parametrize("name", ["rope+gqa", "learned+mqa+window", "rope+mqa+windows"])
def test_generation_with_the_cache_gives_the_no_cache_tokens(name):
    model = tiny_gpt(**OPTIONS[name])
    prompt = torch.randint(0, 100, (2, 3))
    # 40 tokens: past context_length (16), so the window slides and the cache is rebuilt.
    cached = generate_tokens(model, prompt, 40, temperature=0)
    assert torch.equal(cached, generate_tokens(model, prompt, 40, temperature=0, use_cache=False))


# --- The GPT options ------------------------------------------------------------------------


def test_defaults_are_gpt2_and_each_option_picks_its_ladder_step():
    assert type(tiny_gpt().blocks[0].attn) is MultiHeadAttention
    assert type(tiny_gpt(n_kv_head=2).blocks[0].attn) is GroupedQueryAttention
    assert type(tiny_gpt(pos_embedding="rope").blocks[0].attn) is RotaryAttention
    per_layer = tiny_gpt(sliding_window=[3, None])
    assert type(per_layer.blocks[0].attn) is SlidingWindowAttention
    assert per_layer.blocks[0].attn.window == 3
    assert type(per_layer.blocks[1].attn) is MultiHeadAttention
    names = set(tiny_gpt().state_dict())
    assert names - {"position_embedding.weight"} == set(tiny_gpt(pos_embedding="rope").state_dict())
    assert names == set(tiny_gpt(n_kv_head=1, sliding_window=4).state_dict())


def test_rope_model_has_no_position_table_and_counts_right():
    learned, rope = tiny_gpt(), tiny_gpt(pos_embedding="rope")
    assert rope.position_embedding is None
    assert rope.num_params() == learned.num_params() - 16 * D
    assert rope.num_params(include_position_embeddings=False) == rope.num_params()
    assert rope.flops_per_token() == learned.flops_per_token()
    gqa = tiny_gpt(n_kv_head=1)  # keys and values: 2 × (D → 8) per layer instead of 2 × (D → D)
    assert learned.num_params() - gqa.num_params() == 2 * 2 * (D - 8) * (D + 1)


def test_sliding_window_flops_count_the_window_not_the_context():
    full, windowed = tiny_gpt(), tiny_gpt(sliding_window=[4, None])
    per_position = 12 * HEADS * 8  # 12·H·Q per attended position per layer
    assert full.flops_per_token() - windowed.flops_per_token() == per_position * (16 - 4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_kv_head": 3}, r"n_head \(4\) must be divisible by n_kv_head \(3\)"),
        ({"n_kv_head": 0}, "must be divisible by n_kv_head"),
        ({"pos_embedding": "alibi"}, "pos_embedding must be 'learned' or 'rope'"),
        ({"pos_embedding": "rope", "n_head": 8, "n_embd": 24}, "needs an even head size"),
        ({"rope_theta": 0.0}, "rope_theta must be a positive finite number"),
        ({"rope_theta": math.inf}, "rope_theta must be a positive finite number"),
        ({"sliding_window": 0}, "sliding_window must be None, a positive integer"),
        ({"sliding_window": [4, -1]}, "got -1"),
        ({"sliding_window": [4]}, "has 1 entries but the model has n_layer=2"),
        ({"sliding_window": "8"}, "sliding_window must be None, a positive integer"),
    ],
)
def test_bad_options_raise_one_clear_line(options, message):
    with pytest.raises(ValueError, match=message) as error:
        tiny_config(**options)
    assert "\n" not in str(error.value)


def test_modern_presets():
    micro = GPT(PRESETS["gpt-micro-modern"])
    assert micro.position_embedding is None and micro.config.kv_heads < micro.config.n_head
    assert micro.num_params() < 10_000_000  # CPU-sized
    config = PRESETS["gpt2-modern"]
    assert config.pos_embedding == "rope" and config.kv_heads == 4
    with torch.device("meta"):
        assert 110e6 < GPT(config).num_params() < 130e6  # about GPT-2 small


# --- Files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rope+gqa", "rope+mqa+windows", "learned+mqa+window"])
def test_every_option_round_trips_through_our_files(tmp_path, name):
    model = tiny_gpt(**OPTIONS[name])
    idx = torch.randint(0, 100, (2, 16))
    save_model(model, tmp_path / "model.safetensors", BYTES)
    checkpoint = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"model": model.config.to_dict(), "tokenizer": BYTES},
    }
    torch.save(checkpoint, tmp_path / "last.ckpt")
    for path in (tmp_path / "model.safetensors", tmp_path / "last.ckpt"):
        loaded, _ = load_model(path)
        assert loaded.config == model.config
        with torch.no_grad():
            assert torch.equal(loaded(idx)[0], model(idx)[0])


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"n_kv_head": 2}, "grouped-query attention"),
        ({"pos_embedding": "rope"}, "pos_embedding='rope'"),
        ({"sliding_window": [3, None]}, "sliding_window=[3, None]"),
    ],
)
def test_hugging_face_export_refuses_what_gpt2_cannot_express(tmp_path, options, named):
    with pytest.raises(ValueError, match="GPT-2 cannot express") as error:
        save_hf(tiny_gpt(**options), tmp_path / "hf")
    assert named in str(error.value)
    assert not (tmp_path / "hf").exists()  # refused before anything was written


def test_resuming_a_checkpoint_from_before_the_options_still_works():
    old = {"vocab_size": 50, "context_length": 8, "n_layer": 1, "n_head": 2, "n_embd": 8}
    module = GPTLightningModule(model=old, tokenizer=BYTES)
    module.on_load_checkpoint({"hyper_parameters": {"model": old}})  # new fields: defaults
    rope = GPTLightningModule(model={**old, "pos_embedding": "rope"}, tokenizer=BYTES)
    with pytest.raises(ValueError, match="pos_embedding: 'learned' in the checkpoint, 'rope'"):
        rope.on_load_checkpoint({"hyper_parameters": {"model": old}})


# --- Training through scripts/train.py's config ---------------------------------------------


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    lines = [f"{n} said: the {t} is blue.\n" for n in ("Anna", "Ben") for t in ("sky", "sea")]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(lines) * 60)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["model.n_kv_head=1"], {"n_kv_head": 1}),
        (["model.pos_embedding=rope", "model.rope_theta=500"], {"rope_theta": 500.0}),
        (["model.sliding_window=[4,null]"], {"sliding_window": [4, None]}),
        (
            ["model.pos_embedding=rope", "model.n_kv_head=1", "model.sliding_window=8"],
            {"pos_embedding": "rope", "n_kv_head": 1, "sliding_window": 8},
        ),
    ],
)
def test_a_few_training_steps_with_each_option(corpus, tmp_path, options, expected):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(corpus, run_dir, *options, "trainer.max_steps=4")
    train(compose_run(overrides, run_dir))
    model, _ = load_model(run_dir / "checkpoints" / "last.ckpt")
    for key, value in expected.items():  # the Hydra overrides reached the trained model
        assert getattr(model.config, key) == value, key
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"attention/layer_0", "attention/layer_1"} <= set(events.Tags()["images"])
    assert all(math.isfinite(event.value) for event in events.Scalars("val/loss"))


def test_hydra_overrides_type_the_new_fields(corpus, tmp_path):
    overrides = [
        *tiny_overrides(corpus, tmp_path),
        "model=gpt-micro-modern",
        "model.n_kv_head=null",
        "model.sliding_window=[8,null]",
        "model.rope_theta=1e6",
    ]
    overrides.remove("model=gpt-nano")
    cfg = compose_run(overrides, tmp_path)
    config = GPTConfig(**{**OmegaConf.to_container(cfg.model), "vocab_size": 257})
    assert config.kv_heads == config.n_head and config.pos_embedding == "rope"
    assert config.layer_windows == [8, None] and config.rope_theta == 1e6
    with pytest.raises(Exception, match="rope_theta"):  # typed: a float, not text
        compose_run([*overrides, "model.rope_theta=fast"], tmp_path)
