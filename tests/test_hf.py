"""GPT-2 weights: our GPT and transformers' GPT2LMHeadModel agree after import and export.

Models are built from small random ``GPT2Config``s: nothing is downloaded.
"""

import re
from dataclasses import replace

import pytest
import torch

from llm.checkpoint import load_model, save_hf
from llm.generate import generate_tokens
from llm.hf import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from llm.model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

# Tiny GPT-2s of different depths, widths and head counts. Vocabularies of 100 and 131 are not
# multiples of 64: padding rows are added on import and dropped on export (64 needs none).
SIZES = [
    {"n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": 100, "n_positions": 40},
    {"n_layer": 3, "n_head": 4, "n_embd": 32, "vocab_size": 131, "n_positions": 48},
    {"n_layer": 2, "n_head": 3, "n_embd": 24, "vocab_size": 64, "n_positions": 32},
]
# The four released GPT-2 checkpoints' config.json dimensions.
GPT2_SIZES = {
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768},
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024},
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280},
    "gpt2-xl": {"n_layer": 48, "n_head": 25, "n_embd": 1600},
}


def random_hf_model(size: dict, seed: int = 0):
    """A GPT2LMHeadModel whose every weight is random: GPT-2 starts biases at 0 and LayerNorm
    scales at 1, which would hide a bias or scale mapped to the wrong place."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**size, bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def random_gpt(seed: int = 0, **fields: object) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**({"vocab_size": 100, "context_length": 40} | fields)))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


def logits_of(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        output = model(idx)
    return output.logits if hasattr(output, "logits") else output[0]


def hf_greedy(model, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(
        idx, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )


@pytest.mark.parametrize("size", SIZES)
def test_hugging_face_model_loads_into_gpt_with_the_same_logits_and_greedy_tokens(tmp_path, size):
    hf_model = random_hf_model(size)
    hf_model.save_pretrained(tmp_path)
    ours, tokenizer = load_model(tmp_path)
    assert tokenizer == {"name": "gpt2", "path": None}
    assert ours.config.padded_vocab_size % 64 == 0
    idx = torch.randint(0, size["vocab_size"], (2, 12))
    assert torch.allclose(logits_of(ours, idx), logits_of(hf_model, idx), atol=1e-4, rtol=0)
    prompt = idx[:1, :6]
    assert torch.equal(
        generate_tokens(ours, prompt, 20, temperature=0), hf_greedy(hf_model, prompt, 20)
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"n_layer": 2, "n_head": 2, "n_embd": 16},
        {"n_layer": 3, "n_head": 4, "n_embd": 32, "vocab_size": 131},
        # GPT-2 has no bias-free or untied variant: exported as zero biases and an lm_head.
        {"n_layer": 2, "n_head": 2, "n_embd": 16, "bias": False, "qkv_bias": False},
        {"n_layer": 2, "n_head": 2, "n_embd": 16, "tie_embeddings": False},
    ],
)
def test_exported_gpt_loads_in_transformers_with_the_same_logits_and_greedy_tokens(
    tmp_path, fields
):
    ours = random_gpt(**fields)
    save_hf(ours, tmp_path)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, 12))
    assert torch.allclose(logits_of(hf_model, idx), logits_of(ours, idx), atol=1e-4, rtol=0)
    prompt = idx[:1, :6]
    assert torch.equal(
        hf_greedy(hf_model, prompt, 20), generate_tokens(ours, prompt, 20, temperature=0)
    )


@pytest.mark.parametrize("size", SIZES)
def test_state_dict_conversion_round_trips_exactly(size):
    fields = {key: size[key] for key in ("n_layer", "n_head", "n_embd", "vocab_size")}
    ours = random_gpt(**fields)
    vocab, width = size["vocab_size"], size["n_embd"]
    hf_state = to_hf_state_dict(ours.state_dict(), ours.config)
    assert hf_state["transformer.h.0.attn.c_attn.weight"].shape == (width, 3 * width)  # Conv1D
    assert hf_state["transformer.wte.weight"].shape == (vocab, width)  # padding dropped
    back = from_hf_state_dict(hf_state, ours.config)
    expected = {k: v for k, v in ours.state_dict().items() if k != "lm_head.weight"}  # tied
    assert back.keys() == expected.keys()
    embedding = back.pop("token_embedding.weight")
    assert torch.equal(embedding[:vocab], expected.pop("token_embedding.weight")[:vocab])
    assert (embedding[vocab:] == 0).all()  # padding rows come back as zeros
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("preset", list(GPT2_SIZES))
def test_the_four_gpt2_presets_map_to_the_released_gpt2_configs(preset):
    released = transformers.GPT2Config(**GPT2_SIZES[preset])  # vocab 50257, 1024 positions
    ours = GPTConfig.from_preset(preset)
    exported = transformers.GPT2Config(**to_hf_config(ours))
    for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "activation_function"):
        assert getattr(exported, key) == getattr(released, key), key
    assert exported.n_inner is None and released.n_inner is None  # both 4 * n_embd
    assert from_hf_config(released.to_dict()) == replace(ours, dropout=released.resid_pdrop)
    with_eot = to_hf_config(ours, eot_token=50256)
    assert with_eot["bos_token_id"] == with_eot["eos_token_id"] == 50256  # GPT-2's both


def test_openai_style_names_and_attention_mask_buffers_are_understood():
    """OpenAI's gpt2 checkpoint names weights without ``transformer.`` and stores the causal
    mask buffers ``attn.bias`` next to them; a tied ``lm_head.weight`` may be present too."""
    hf_model = random_hf_model(SIZES[0])
    config = from_hf_config(hf_model.config.to_dict())
    hf_state = {name.removeprefix("transformer."): t for name, t in hf_model.state_dict().items()}
    hf_state["h.0.attn.bias"] = torch.ones(1, 1, 40, 40).tril()
    hf_state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    ours = GPT(config).eval()
    ours.load_state_dict(from_hf_state_dict(hf_state, config), strict=False)
    idx = torch.randint(0, 100, (1, 10))
    assert torch.allclose(logits_of(ours, idx), logits_of(hf_model, idx), atol=1e-4, rtol=0)


def test_missing_or_extra_gpt2_weights_are_named():
    hf_model = random_hf_model(SIZES[2])  # two layers
    config = from_hf_config(hf_model.config.to_dict())
    hf_state = dict(hf_model.state_dict())
    with pytest.raises(ValueError, match=r"no place for, such as transformer\.h\.1\."):
        from_hf_state_dict(hf_state, replace(config, n_layer=1))
    del hf_state["transformer.h.0.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"lack 1 tensors, such as transformer\.h\.0\.mlp\.c_fc"):
        from_hf_state_dict(hf_state, config)


@pytest.mark.parametrize("bias", [True, False])
def test_a_model_goes_to_gpt2_and_back_with_or_without_biases(bias):
    config = GPTConfig(vocab_size=100, context_length=16, n_layer=2, n_head=2, n_embd=8, bias=bias)
    ours, back = GPT(config).eval(), GPT(config).eval()
    # GPT-2 has biases everywhere: a model without them goes out with zeros, which come back.
    back.load_state_dict(
        from_hf_state_dict(to_hf_state_dict(ours.state_dict(), config), config), strict=False
    )
    idx = torch.randint(0, 100, (1, 10))
    assert torch.equal(logits_of(back, idx), logits_of(ours, idx))


def test_gpt2_weights_of_the_wrong_shape_are_named_as_gpt2_stores_them():
    hf_model = random_hf_model(SIZES[2])
    config = from_hf_config(hf_model.config.to_dict())
    hf_state = dict(hf_model.state_dict())
    wte, c_attn = hf_state["transformer.wte.weight"], hf_state["transformer.h.0.attn.c_attn.weight"]
    for name, tensor, message in (
        ("transformer.wte.weight", wte[:, 0], f"wte.weight has shape ({len(wte)},), not "),
        ("transformer.h.0.attn.c_attn.weight", c_attn[None], "c_attn.weight has shape (1, "),
        (
            "transformer.wte.weight",
            wte[:-1],
            f"shape {tuple(wte[:-1].shape)}, not {tuple(wte.shape)}",
        ),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            from_hf_state_dict({**hf_state, name: tensor}, config)


@pytest.mark.parametrize(
    ("key", "value"),
    [("activation_function", "relu"), ("n_inner", 99), ("scale_attn_by_inverse_layer_idx", True)],
)
def test_gpt2_variants_our_model_does_not_compute_are_refused(key, value):
    config = transformers.GPT2Config(**SIZES[0], **{key: value})
    with pytest.raises(ValueError, match=f"GPT-2 config has {key}="):
        from_hf_config(config.to_dict())


@pytest.mark.parametrize(("key", "value"), [("n_embd", None), ("n_layer", "12"), ("n_head", 0)])
def test_gpt2_configs_with_impossible_sizes_are_refused(key, value):
    config = transformers.GPT2Config(**SIZES[0]).to_dict() | {key: value}
    with pytest.raises(ValueError, match="must be a positive integer"):
        from_hf_config(config)
