"""Model files: every format loads to the same model, saves are atomic, and bad files get one
clear error."""

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import llm.checkpoint
from llm.callbacks import AtomicCheckpointIO
from llm.checkpoint import (
    load_model,
    load_model_and_tokenizer,
    model_from_weights,
    save_hf,
    save_model,
    training_checkpoint_summary,
)
from llm.model import GPT, GPTConfig

BYTES = {"name": "bytes", "path": None}


def tiny_model(**overrides: object) -> GPT:
    torch.manual_seed(0)
    fields = dict(vocab_size=257, context_length=16, n_layer=2, n_head=2, n_embd=16)
    return GPT(GPTConfig(**(fields | overrides))).eval()


def write_training_checkpoint(model: GPT, path: Path, prefix: str = "model.", **extra) -> None:
    """The training checkpoint layout: the GPT's weights under ``model.``, beside other state."""
    state_dict = {f"{prefix}{name}": tensor for name, tensor in model.state_dict().items()}
    state_dict["loss_fn.weight"] = torch.ones(3)  # not the model's: must be ignored
    checkpoint = {
        "state_dict": state_dict,
        "hyper_parameters": {"model": model.config.to_dict(), "tokenizer": BYTES},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}],
        "global_step": 7,
    } | extra
    torch.save(checkpoint, path)


def same_logits(a: GPT, b: GPT) -> bool:
    idx = torch.randint(0, a.config.vocab_size, (2, 8))
    with torch.no_grad():
        return torch.equal(a(idx)[0], b(idx)[0])


@pytest.mark.parametrize("prefix", ["model.", "model._orig_mod."])  # plain and torch.compile'd
def test_training_checkpoint_loads_with_its_config_and_tokenizer(tmp_path, prefix):
    model = tiny_model()
    write_training_checkpoint(model, tmp_path / "last.ckpt", prefix)
    loaded, tokenizer = load_model(tmp_path / "last.ckpt")
    assert tokenizer == BYTES
    assert loaded.config == model.config
    assert not loaded.training
    assert same_logits(model, loaded)


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_safetensors_round_trip_keeps_config_tokenizer_weights_and_tying(tmp_path, tie_embeddings):
    model = tiny_model(tie_embeddings=tie_embeddings, bias=False)
    save_model(model, tmp_path / "model.safetensors", BYTES)
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temporary file left behind
    with safe_open(tmp_path / "model.safetensors", framework="pt") as file:
        assert json.loads(file.metadata()["config"]) == model.config.to_dict()
    loaded, tokenizer = load_model(str(tmp_path / "model.safetensors"))
    assert tokenizer == BYTES
    assert loaded.config == model.config
    assert same_logits(model, loaded)
    assert (loaded.lm_head.weight is loaded.token_embedding.weight) == tie_embeddings


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_hugging_face_folder_loads_with_the_gpt2_tokenizer(tmp_path, tie_embeddings):
    model = tiny_model(tie_embeddings=tie_embeddings)
    save_hf(model, tmp_path / "hf")
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    loaded, tokenizer = load_model(tmp_path / "hf")
    assert tokenizer == {"name": "gpt2", "path": None}
    assert loaded.config == model.config
    assert same_logits(model, loaded)
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"hf is a folder without model\.safetensors; give"):
        load_model(tmp_path / "hf")


def test_hugging_face_folder_keeps_a_tokenizer_other_than_gpt2s(tmp_path):
    save_hf(tiny_model(), tmp_path / "hf", eot_token=256, tokenizer=BYTES)
    assert load_model(tmp_path / "hf")[1] == BYTES


def test_a_torch_compiled_gpt_saves_under_the_gpts_own_names(tmp_path):
    model = tiny_model()
    compiled = torch.compile(model)  # its state_dict's names start with _orig_mod.
    save_model(compiled, tmp_path / "model.safetensors", BYTES)
    save_hf(compiled, tmp_path / "hf")
    assert same_logits(model, load_model(tmp_path / "model.safetensors")[0])
    assert same_logits(model, load_model(tmp_path / "hf")[0])


def test_a_file_is_recognised_by_its_content_not_its_name(tmp_path):
    model = tiny_model()
    save_model(model, tmp_path / "model.ckpt", BYTES)  # safetensors under a .ckpt name
    assert same_logits(model, load_model(tmp_path / "model.ckpt")[0])


def test_a_failed_save_leaves_neither_a_partial_file_nor_a_changed_old_one(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")

    def fail_halfway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(llm.checkpoint, "save_file", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_model(tiny_model(), path, BYTES)
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert path.read_bytes() == b"old"


def test_training_checkpoints_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"old")

    def move_cut_short(source: str, destination: str) -> None:
        # Lightning's writer moves its file from the system's temporary folder: across file
        # systems that move is a copy, and here it is cut short.
        Path(destination).write_bytes(Path(source).read_bytes()[:10])
        raise OSError("interrupted")

    monkeypatch.setattr(shutil, "move", move_cut_short)
    with pytest.raises(OSError, match="interrupted"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    assert os.listdir(tmp_path) == ["last.ckpt"]
    assert path.read_bytes() == b"old"
    monkeypatch.undo()
    AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    assert os.listdir(tmp_path) == ["last.ckpt"]
    assert torch.load(path, weights_only=True) == {"step": 2}


# --- Bad files ------------------------------------------------------------------------------


def test_a_missing_file_names_the_accepted_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not found: give a training checkpoint \(.ckpt\)"):
        load_model(tmp_path / "nope.ckpt")


def test_an_unknown_format_is_refused(tmp_path):
    (tmp_path / "notes.ckpt").write_text("hello, not a model\n")
    with pytest.raises(ValueError, match="is not a model file llm knows"):
        load_model(tmp_path / "notes.ckpt")


def test_a_file_of_another_kind_is_no_training_checkpoint(tmp_path):
    (tmp_path / "notes.ckpt").write_text("hello, not a model\n")  # no zip, no pickle
    with pytest.raises(ValueError, match=r"notes\.ckpt is not a file torch\.save wrote"):
        training_checkpoint_summary(tmp_path / "notes.ckpt")


def test_a_truncated_training_checkpoint_is_reported_as_corrupt(tmp_path):
    write_training_checkpoint(tiny_model(), tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"could not be read as a training checkpoint .*corrupt"):
        load_model(tmp_path / "cut.ckpt")


def test_a_torch_file_that_is_not_a_training_checkpoint_is_refused(tmp_path):
    torch.save(tiny_model().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="is not an llm training checkpoint"):
        load_model(tmp_path / "weights.pt")
    write_training_checkpoint(tiny_model(), tmp_path / "other.ckpt")  # another module's hparams
    checkpoint = torch.load(tmp_path / "other.ckpt", weights_only=True)
    del checkpoint["hyper_parameters"]["model"]
    torch.save(checkpoint, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="with 'model' and 'tokenizer'"):
        load_model(tmp_path / "other.ckpt")


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    model = tiny_model()
    write_training_checkpoint(model, tmp_path / "bad.ckpt")
    checkpoint = torch.load(tmp_path / "bad.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["model"]["n_layer"] = 3
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"do not fit the model's config .*missing blocks\.2"):
        load_model(tmp_path / "bad.ckpt")
    checkpoint["hyper_parameters"]["model"]["n_layer"] = 2
    checkpoint["state_dict"]["model.final_norm.weight"] = torch.ones(16, dtype=torch.long)
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"final_norm\.weight holds torch\.int64, not floating"):
        load_model(tmp_path / "bad.ckpt")
    with zipfile.ZipFile(tmp_path / "other.ckpt", "w") as archive:  # a zip, not torch's
        archive.writestr("notes.txt", "hi")
    with pytest.raises(ValueError, match=r"checkpoint \(file in archive is not in a subdir"):
        load_model(tmp_path / "other.ckpt")


def test_weights_of_other_shapes_or_names_are_refused_and_the_rest_load_as_float32():
    model = tiny_model()
    weights = {name: t.bfloat16() for name, t in model.state_dict().items()}
    loaded = model_from_weights(model.config, weights, "here")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for name, tensor, problem in [
        ("final_norm.weight", torch.ones(3), r"final_norm\.weight has shape \(3,\), not \(16,\)"),
        ("loss_fn.weight", torch.ones(3), r"unexpected loss_fn\.weight"),
    ]:
        with pytest.raises(ValueError, match=rf"^here: the weights do not fit .*{problem}"):
            model_from_weights(model.config, {**weights, name: tensor}, "here")


def test_a_checkpoint_holding_something_other_than_a_tensor_is_refused(tmp_path):
    write_training_checkpoint(tiny_model(), tmp_path / "bad.ckpt")
    checkpoint = torch.load(tmp_path / "bad.ckpt", weights_only=True)
    checkpoint["state_dict"]["model.final_norm.weight"] = 3
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"holds int model\.final_norm\.weight in its state_dict"):
        load_model(tmp_path / "bad.ckpt")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused(tmp_path, value):
    """Sampling from them would fail deep inside torch.multinomial, or draw blank maps."""
    model = tiny_model()
    with torch.no_grad():
        model.blocks[1].mlp.fc.weight[3, 5] = value
    save_model(model, tmp_path / "model.safetensors", BYTES)
    with pytest.raises(ValueError, match=r"1 of the model's weight tensors, such as blocks\.1"):
        load_model(tmp_path / "model.safetensors")


def test_a_bad_config_in_a_checkpoint_is_refused(tmp_path):
    write_training_checkpoint(tiny_model(), tmp_path / "bad.ckpt")
    checkpoint = torch.load(tmp_path / "bad.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["model"]["n_layers"] = 3  # a typo'd field
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="holds a model config llm cannot use"):
        load_model(tmp_path / "bad.ckpt")


def test_safetensors_without_llm_metadata_is_refused(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="without llm's config and tokenizer metadata"):
        load_model(tmp_path / "other.safetensors")


def test_a_truncated_safetensors_file_is_reported_as_corrupt(tmp_path):
    save_model(tiny_model(), tmp_path / "full.safetensors", BYTES)
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        load_model(tmp_path / "cut.safetensors")


def test_a_folder_without_a_gpt2_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"folder without config\.json and model\.safetensors"):
        load_model(tmp_path)


def test_a_safetensors_header_length_that_starts_like_a_pickle_still_loads(tmp_path):
    """A safetensors file starts with its header's length: 1 in 32 of them with the byte that
    also starts a pickle. The header may be padded with spaces, which makes one such file."""
    model = tiny_model()
    save_model(model, tmp_path / "model.safetensors", BYTES)
    data = (tmp_path / "model.safetensors").read_bytes()
    length = int.from_bytes(data[:8], "little")
    padded = length + (0x80 - length) % 256  # the next length whose low byte is 0x80
    header = data[8 : 8 + length] + b" " * (padded - length)
    (tmp_path / "padded.safetensors").write_bytes(
        padded.to_bytes(8, "little") + header + data[8 + length :]
    )
    assert (tmp_path / "padded.safetensors").read_bytes()[:1] == b"\x80"
    assert same_logits(model, load_model(tmp_path / "padded.safetensors")[0])


@pytest.mark.parametrize(
    "spec",
    [
        {"nme": "bytes"},
        {"path": None},
        {"name": 5},
        ["bytes"],
        {"name": "bytes", "path": None, "x": 1},
        {"name": "bytes", "path": 5},
    ],
)
def test_a_garbled_tokenizer_in_a_model_file_is_refused(tmp_path, spec):
    write_training_checkpoint(tiny_model(), tmp_path / "bad.ckpt")
    checkpoint = torch.load(tmp_path / "bad.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["tokenizer"] = spec
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=f"names its tokenizer as {re.escape(repr(spec))}, not"):
        load_model(tmp_path / "bad.ckpt")


def test_a_given_ranks_file_stands_in_for_the_one_the_model_names(tmp_path, tiny_ranks_file):
    vocab_size = len(tiny_ranks_file.read_bytes().splitlines()) + 1  # <|endoftext|> last
    named = {"name": "tiny", "path": str(tmp_path / "gone.tiktoken")}  # moved since training
    save_model(tiny_model(vocab_size=vocab_size), tmp_path / "model.safetensors", named)
    _, tokenizer = load_model_and_tokenizer(
        tmp_path / "model.safetensors", tokenizer_path=str(tiny_ranks_file)
    )
    assert tokenizer.name == "tiny" and tokenizer.vocab_size == vocab_size
    with pytest.raises(FileNotFoundError, match=r"gone\.tiktoken not found"):
        load_model_and_tokenizer(tmp_path / "model.safetensors")


def test_a_model_and_a_tokenizer_of_other_vocabularies_are_refused(tmp_path):
    save_model(tiny_model(), tmp_path / "model.safetensors", BYTES)
    model, tokenizer = load_model_and_tokenizer(tmp_path / "model.safetensors")
    assert tokenizer.vocab_size == model.config.vocab_size == 257
    save_model(tiny_model(vocab_size=300), tmp_path / "other.safetensors", BYTES)
    with pytest.raises(ValueError, match="vocabulary of 300 tokens, but the tokenizer 'bytes' has"):
        load_model_and_tokenizer(tmp_path / "other.safetensors")


def test_a_hugging_face_folder_of_another_vocabulary_says_where_to_name_its_tokenizer(
    tmp_path, tiny_ranks_file
):
    save_hf(tiny_model(), tmp_path / "hf")  # a bytes model, exported without its tokenizer
    with pytest.raises(ValueError, match=r"in its config\.json as \"llm_tokenizer\": \{\"name\""):
        load_model_and_tokenizer(tmp_path / "hf", tokenizer_path=str(tiny_ranks_file))


@pytest.mark.parametrize(
    ("save", "spec", "message"),
    [
        (save_model, None, r"tokenizer must be a spec such as \{'name': 'gpt2'"),
        (save_model, "bytes", r"tokenizer must be a spec such as \{'name': 'gpt2'"),
        (save_hf, {"name": "bytes", "vocab": 257}, r"tokenizer must be a spec such as"),
        (
            save_model,  # the bytes tokenizer has no ranks file: loading it would refuse the path
            {"name": "bytes", "path": "gpt2.tiktoken"},
            r"the bytes tokenizer has no ranks file: drop tokenizer\['path'\], or name",
        ),
        (save_hf, {"name": "nosuch", "path": None}, r"unknown tokenizer 'nosuch': use one of"),
    ],
)
def test_a_tokenizer_spec_that_loading_would_refuse_is_not_saved(tmp_path, save, spec, message):
    with pytest.raises(ValueError, match=message):
        save(tiny_model(), tmp_path / "model", tokenizer=spec)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("destination", "problem"),
    [
        ("", "'' names no file"),
        ("folder", r"cannot write the file .*folder: it is a folder"),
        ("a_file/model.safetensors", r"cannot write in .*a_file \(.*a_file is not a folder\)"),
    ],
)
def test_a_destination_that_cannot_be_a_file_is_refused_in_one_line(
    tmp_path, monkeypatch, destination, problem
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_text("in the way")
    with pytest.raises(ValueError, match=f"{problem}: set save_model's path to a file path"):
        save_model(tiny_model(), destination, BYTES)
    assert sorted(os.listdir(tmp_path)) == ["a_file", "folder"]
    assert os.listdir(tmp_path / "folder") == []


def test_saves_go_where_the_file_system_finds_their_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_model()
    save_model(model, "out/missing/../model.safetensors", BYTES)  # out/model.safetensors
    save_hf(model, "hf/missing/../gpt2")  # hf/gpt2
    assert same_logits(model, load_model("out/model.safetensors")[0])
    assert same_logits(model, load_model("hf/gpt2")[0])
    assert os.listdir("out") == ["model.safetensors"] and os.listdir("hf") == ["gpt2"]
    with pytest.raises(ValueError, match="an empty path is no folder: set save_hf's folder"):
        save_hf(model, "")
    with pytest.raises(ValueError, match=r"eot_token must be a token id in \[0, 257\)"):
        save_hf(model, "hf/other", eot_token=257)
    assert sorted(os.listdir(tmp_path)) == ["hf", "out"] and os.listdir("hf") == ["gpt2"]


def test_a_hugging_face_export_replaces_the_folders_pair_whole_or_not_at_all(tmp_path, monkeypatch):
    old, new = tiny_model(), tiny_model(n_layer=1)
    save_hf(old, tmp_path / "hf")

    def interrupted(self: Path, *args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C once the weights are written, at the config

    syncs: list[int] = []

    def fails_second(descriptor: int) -> None:  # the disk refuses the second file's sync
        syncs.append(descriptor)
        if len(syncs) == 2:
            raise OSError(5, "Input/output error")

    for target, name, replacement, error in (
        (Path, "write_text", interrupted, KeyboardInterrupt),
        (os, "fsync", fails_second, OSError),
    ):
        with monkeypatch.context() as patched:
            patched.setattr(target, name, replacement)
            with pytest.raises(error):
                save_hf(new, tmp_path / "hf")
        assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
        assert same_logits(old, load_model(tmp_path / "hf")[0])  # the old pair, both
    (tmp_path / "other" / "config.json").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"other/config\.json: it is a folder; move it away"):
        save_hf(new, tmp_path / "other")
    assert os.listdir(tmp_path / "other") == ["config.json"]  # no weights beside it


def test_checkpoint_readers_take_string_paths_and_refuse_unusable_devices(tmp_path):
    write_training_checkpoint(tiny_model(), tmp_path / "run.ckpt")
    assert training_checkpoint_summary(str(tmp_path / "run.ckpt")).step == 7
    with pytest.raises(FileNotFoundError, match=r"training checkpoint .*nope\.ckpt not found"):
        training_checkpoint_summary(str(tmp_path / "nope.ckpt"))
    with pytest.raises(ValueError, match=r"device 'tpu' cannot be used here .*; use 'cpu'"):
        load_model(tmp_path / "run.ckpt", device="tpu")
