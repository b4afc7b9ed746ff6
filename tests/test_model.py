"""The GPT: configuration, parameter count, loss, caching, and that it can learn."""

import math
from dataclasses import replace

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

import llm.loss
import llm.model
from llm.model import GPT, PRESETS, GPTConfig

TINY = GPTConfig(vocab_size=100, context_length=16, n_layer=2, n_head=2, n_embd=32)


def compiled_keeping_graphs(function):
    """``function`` under torch.compile through AOTAutograd, without Inductor's code generation
    (fast), and the list that collects the graphs Dynamo captures."""
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return lookup_backend("aot_eager")(graph, example_inputs)

    return torch.compile(function, backend=backend), graphs


def test_gpt2_small_has_gpt2_parameter_count():
    model = GPT(GPTConfig.from_preset("gpt2"))
    assert model.num_params() == 124_439_808
    assert model.num_params(include_position_embeddings=False) == 124_439_808 - 1024 * 768
    assert model.token_embedding.weight.shape == (50304, 768)  # padded to a multiple of 64


def test_summary_names_shape_parameters_and_flops():
    # 6 * 123,653,376 parameters besides positions + 12 * 12 layers * 768 wide * 1024 positions
    assert GPT(GPTConfig.from_preset("gpt2")).summary() == (
        "GPT: 12 layers, 12 heads, width 768, context 1024, vocabulary 50257 (padded to 50304); "
        "124.44M parameters, 855.2 MFLOP per token to train"
    )
    unpadded = GPTConfig(vocab_size=128, context_length=16, n_layer=2, n_head=2, n_embd=32)
    assert "vocabulary 128;" in GPT(unpadded).summary()  # a multiple of 64 already
    one = GPTConfig(vocab_size=128, context_length=16, n_layer=1, n_head=1, n_embd=32)
    assert GPT(one).summary().startswith("GPT: 1 layer, 1 head, width 32")


def test_presets_build_and_differ():
    sizes = {name: (c.n_layer, c.n_head, c.n_embd) for name, c in PRESETS.items()}
    assert sizes["gpt2-xl"] == (48, 25, 1600)
    assert len({repr(config) for config in PRESETS.values()}) == len(PRESETS)  # all differ
    assert sum(c.is_gpt2 for c in PRESETS.values()) == len(PRESETS) - 2  # two modern ones
    with pytest.raises(ValueError, match="Unknown model preset"):
        GPTConfig.from_preset("gpt5")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_embd": 30, "n_head": 4}, "divisible by n_head"),
        ({"n_layer": 0}, "n_layer must be a positive integer"),
        ({"vocab_size": -5}, "vocab_size must be a positive integer"),
        ({"context_length": 2.5}, "context_length must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"tie_embeddings": "false"}, "tie_embeddings must be True or False, got 'false'"),
        ({"bias": 0}, "bias must be True or False, got 0"),
    ],
)
def test_bad_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**TINY.to_dict(), **overrides})


def test_a_gpt_takes_a_config_and_one_kv_cache_per_layer():
    with pytest.raises(TypeError, match=r"GPT takes a GPTConfig, got str: use GPT\(GPTConfig"):
        GPT("gpt-nano")  # type: ignore[arg-type]
    model = GPT(TINY).eval()
    idx = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"one KV cache per layer \(2, from new_kv_caches\(\)\)"):
        model(idx, kv_caches=model.new_kv_caches()[:1])
    caches = model.new_kv_caches()
    model(idx, kv_caches=caches)
    with pytest.raises(ValueError, match=r"KV cache holds keys of shape .* one cache per layer"):
        model(torch.zeros(2, 1, dtype=torch.long), kv_caches=caches)  # another batch size
    with pytest.raises(ValueError, match="max_length must be a positive whole number"):
        model.new_kv_caches(0)


def test_initial_loss_is_uniform_guess():
    torch.manual_seed(0)
    config = GPTConfig.from_preset("gpt-micro")
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (4, 64))
    targets = torch.randint(0, config.vocab_size, (4, 64))
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 64, config.vocab_size)  # padding logits are cut off
    assert abs(loss.item() - math.log(config.vocab_size)) < 0.3


def test_loss_ignores_minus_100_and_padding_rows():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx = torch.randint(0, 100, (2, 8))
    targets = torch.randint(0, 100, (2, 8))
    logits, _ = model(idx)
    masked = targets.clone()
    masked[:, 4:] = -100
    _, partial = model(idx, masked)
    log_probs = torch.log_softmax(logits[:, :4], dim=-1)  # over the 100 real tokens only
    expected = -log_probs.gather(-1, targets[:, :4, None]).mean()
    assert torch.allclose(partial, expected, atol=1e-6)
    assert model.lm_head.weight.shape[0] == 128  # 100 padded to 128, yet never in the softmax


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("max_logits", [None, 7 * 128])
def test_loss_alone_equals_forwards_and_takes_logits_in_chunks(monkeypatch, max_logits, compiled):
    # GPT.loss sums the losses of chunks of rows, each with at most max_logits padded logits
    # (48 rows of 128: 6 chunks of 7 rows and one of 6); by default, here, one chunk. Compiled
    # (through AOTAutograd, without Inductor's code generation: fast), it is one
    # LinearCrossEntropy, which makes the gradients in the forward pass. Either way they equal
    # autograd's through forward's loss, scaled by the loss's own gradient (2 here, as 1/n
    # under gradient accumulation).
    torch.manual_seed(0)
    model = GPT(TINY)
    idx, targets = torch.randint(0, 100, (2, 3, 16))
    targets[0, :5] = -100
    _, expected = model(idx, targets)
    (2 * expected).backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    if max_logits:
        monkeypatch.setattr(llm.model, "MAX_LOGITS_PER_CHUNK", max_logits)
    chunk_rows = []
    chunk_loss = llm.loss.cross_entropy_rows
    if compiled:
        loss_of, graphs = compiled_keeping_graphs(model.loss)
    else:  # count the chunks' rows (a side effect torch.compile would refuse here)

        def counted_chunk_loss(logits, *args):
            chunk_rows.append(len(logits))
            return chunk_loss(logits, *args)

        monkeypatch.setattr(llm.loss, "cross_entropy_rows", counted_chunk_loss)
        loss_of = model.loss
    loss = loss_of(idx, targets)
    (2 * loss).backward()
    if compiled:  # each chunk's gradient takes one scatter_add (its targets) in the forward
        assert len(graphs) == 1 and "autograd_function_apply" in graphs[0].code
        assert graphs[0].fwd_body_0.code.count("scatter_add") == (7 if max_logits else 1)
    else:
        assert chunk_rows == ([7] * 6 + [6] if max_logits else [48])
    assert torch.allclose(loss, expected, atol=1e-6)
    for parameter, grad in zip(model.parameters(), expected_grads, strict=True):
        assert torch.allclose(parameter.grad, grad, atol=1e-6)
    with torch.no_grad():  # validation: the loss alone, no gradients made
        assert torch.allclose(loss_of(idx, targets), expected, atol=1e-6)
    targets[0, 0], targets[2, 15] = 150, 300  # in different chunks: both counted in the message
    with pytest.raises(ValueError, match=r"Targets must lie in \[0, 100\) .* in \[\d+, 300\]"):
        model.loss(idx, targets)


def test_compiled_loss_serves_every_batch_size_with_two_graphs():
    # The first call compiles for its shapes, the second for any batch size (dynamic shapes);
    # chunking arithmetic on the batch size would fix it in every graph: one per size.
    loss_of, graphs = compiled_keeping_graphs(GPT(TINY).loss)
    for batch_size in (1, 2, 3, 5):
        idx = torch.randint(0, 100, (batch_size, 16))
        loss_of(idx, idx).backward()
    assert len(graphs) == 2


def test_residual_stream_is_bf16_under_bf16_autocast_only():
    model = GPT(TINY)
    block_inputs = []
    model.blocks[1].register_forward_pre_hook(lambda module, args: block_inputs.append(args[0]))
    idx = torch.randint(0, 100, (1, 8))
    model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
    with torch.autocast("cpu", dtype=torch.float16):  # fp16's range is too narrow for it
        model(idx)
    assert [x.dtype for x in block_inputs] == [torch.float32, torch.bfloat16, torch.float32]
    assert loss.dtype == torch.float32  # the loss itself is taken in fp32


def test_fp16_training_lets_autograd_make_the_loss_gradient():
    # fp16's loss scale reaches the gradients only in the backward pass: LinearCrossEntropy's
    # gradient, made in the forward pass, would underflow first.
    loss_of, graphs = compiled_keeping_graphs(GPT(TINY).loss)
    idx = torch.randint(0, 100, (2, 16))
    with torch.autocast("cpu", dtype=torch.float16):
        loss_of(idx, idx)
    assert len(graphs) == 1 and "autograd_function_apply" not in graphs[0].code


def test_tied_weights_share_storage():
    model = GPT(TINY)
    assert model.lm_head.weight.data_ptr() == model.token_embedding.weight.data_ptr()
    untied = GPT(GPTConfig(**{**TINY.to_dict(), "tie_embeddings": False}))
    assert untied.lm_head.weight.data_ptr() != untied.token_embedding.weight.data_ptr()
    assert untied.num_params() == model.num_params() + 100 * 32


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=100, context_length=16, n_layer=8, n_head=4, n_embd=256))
    expected = 0.02 / math.sqrt(2 * 8)
    assert abs(model.blocks[0].mlp.proj.weight.std().item() - expected) < 0.1 * expected
    assert abs(model.blocks[0].mlp.fc.weight.std().item() - 0.02) < 0.002


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx = torch.randint(0, 100, (4, 16))
    targets = torch.randint(0, 100, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        _, loss = model(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_kv_cache_generation_equals_full_forward():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.randint(0, 100, (2, 16))
    full, _ = model(idx)
    caches = model.new_kv_caches()
    prompt, _ = model(idx[:, :5], kv_caches=caches)  # prefill, then one token at a time
    steps = [model(idx[:, t : t + 1], kv_caches=caches)[0] for t in range(5, 16)]
    assert torch.allclose(torch.cat([prompt, *steps], dim=1), full, atol=1e-5)


def test_attention_weights_of_every_layer_and_head():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    weights = model.attention_weights(torch.randint(0, 100, (3, 7)))
    assert weights.shape == (2, 3, 2, 7, 7)  # (n_layer, B, n_head, T, T)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3, 2, 7), atol=1e-6)
    assert torch.all(weights.triu(diagonal=1) == 0)


def test_too_long_input_raises():
    model = GPT(TINY)
    with pytest.raises(ValueError, match="longer than the model's context_length"):
        model(torch.zeros(1, 17, dtype=torch.long))
    caches = model.new_kv_caches()
    model(torch.zeros(1, 10, dtype=torch.long), kv_caches=caches)
    with pytest.raises(ValueError, match="longer than the model's context_length"):
        model(torch.zeros(1, 7, dtype=torch.long), kv_caches=caches)


@pytest.mark.parametrize("bad_id", [-1, 100, 5000])
def test_token_ids_outside_vocabulary_raise(bad_id):
    idx = torch.zeros(1, 4, dtype=torch.long)
    idx[0, 2] = bad_id
    with pytest.raises(ValueError, match=r"Token ids must lie in \[0, 100\)"):
        GPT(TINY)(idx)


def test_biases_start_at_zero_and_the_embeddings_drop_out_in_training():
    model = GPT(replace(TINY, bias=True, dropout=0.5))
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert biases and all(torch.equal(b, torch.zeros_like(b)) for b in biases if b is not None)
    block_inputs = []
    model.blocks[0].register_forward_pre_hook(lambda _, args: block_inputs.append(args[0]))
    idx = torch.randint(0, 100, (2, 16))
    model.train()(idx)
    model.eval()(idx)
    dropped, kept = block_inputs
    assert (dropped == 0).float().mean() > 0.3 and (kept != 0).all()
    assert model.new_kv_caches(4)[0].max_length == 4


def test_targets_outside_vocabulary_raise_but_ignored_ones_pass():
    model = GPT(TINY)
    idx = torch.zeros(1, 4, dtype=torch.long)
    targets = torch.tensor([[1, 2, -100, 3]])
    _, loss = model(idx, targets)
    assert torch.isfinite(loss)
    assert torch.allclose(model.loss(idx, targets), loss)
    for loss_of in (lambda idx, targets: model(idx, targets)[1], model.loss):
        with pytest.raises(ValueError, match=r"Targets must lie in \[0, 100\) \(or -100, ignored"):
            loss_of(idx, torch.tensor([[1, 2, 100, 3]]))
        with pytest.raises(ValueError, match=r"torch.long of the token ids' shape \(1, 4\), got"):
            loss_of(idx, targets[:, :3])
        with pytest.raises(ValueError, match=r"Targets must be torch.long .* got torch.int32 of"):
            loss_of(idx, targets.int())


@pytest.mark.parametrize(
    ("idx", "problem"),
    [
        (torch.rand(1, 4), r"must be torch.long \(call .long\(\)\), got torch.float32"),
        (torch.zeros(1, 0, dtype=torch.long), r"of at least one token, got \(1, 0\)"),
        (torch.zeros(0, 4, dtype=torch.long), r"at least one sequence .* got \(0, 4\)"),
        (torch.zeros(4, dtype=torch.long), r"must have shape \(batch, tokens\)"),
    ],
)
def test_token_ids_of_the_wrong_kind_raise(idx, problem):
    with pytest.raises(ValueError, match=problem):
        GPT(TINY)(idx)


def test_flops_per_token_follows_palm_formula():
    model = GPT(GPTConfig.from_preset("gpt2"))
    expected = 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 12 * 64 * 1024
    assert model.flops_per_token() == expected
    # Untied, the token embedding is a lookup and the LM head its own matrix: the same matmuls.
    untied = GPT(GPTConfig.from_preset("gpt2", tie_embeddings=False))
    assert untied.num_params() == 124_439_808 + 50_257 * 768
    assert untied.flops_per_token() == expected
