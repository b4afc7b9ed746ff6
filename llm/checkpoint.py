"""Model files: loading a ``GPT`` from any format llm knows, and saving one.

``load_model`` recognises:

- a training checkpoint (a Lightning ``.ckpt``): the GPT's weights under ``model.`` in its
  ``state_dict``, the ``GPTConfig`` fields in ``hyper_parameters["model"]`` and the tokenizer
  in ``hyper_parameters["tokenizer"]``;
- a safetensors file written by ``save_model``: the weights, with the config and tokenizer as
  JSON in the file's metadata;
- a Hugging Face GPT-2 folder (``config.json`` and ``model.safetensors``), which uses the GPT-2
  tokenizer unless its ``config.json`` names another (``llm_tokenizer``). ``save_hf`` writes one
  that ``transformers`` loads.

Files are recognised by their content, not their name. Writes are atomic: a temporary file in
the same folder, renamed into place once complete, so a failed save never leaves half a file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from llm.attention import RotaryEmbedding
from llm.errors import first_line
from llm.files import atomic_path, atomic_paths, check_file, check_folder
from llm.hf import (
    check_exportable,
    from_hf_config,
    from_hf_state_dict,
    to_hf_config,
    to_hf_state_dict,
)
from llm.model import GPT, GPTConfig, own_parameter_name
from llm.tokenizer import (
    MODEL_NAMED,
    Tokenizer,
    TokenizerOptions,
    check_tokenizer_spec,
    load_tokenizer,
)

ACCEPTED = (
    "a training checkpoint (.ckpt), a .safetensors model saved by llm, or a Hugging Face "
    "GPT-2 folder (config.json + model.safetensors)"
)
GPT2_TOKENIZER: dict[str, Any] = {"name": "gpt2", "path": None}
HF_TOKENIZER_KEY = "llm_tokenizer"  # in a Hugging Face config.json: the tokenizer, if not GPT-2's
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
PICKLE_MAGIC = b"\x80"  # the legacy torch.save format starts with a pickle protocol opcode


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, dict[str, Any]]:
    """The model stored at ``path``, in eval mode on ``device``, and its tokenizer spec
    (``load_tokenizer(**spec)`` loads the tokenizer)."""
    _check_device(device)
    config, state_dict, tokenizer = read_model_file(path)
    model = model_from_weights(config, state_dict, path)
    return model.to(device).eval(), tokenizer


def read_model_file(
    path: str | Path, weights: bool = True
) -> tuple[GPTConfig, dict[str, Tensor], dict[str, Any]]:
    """The config, weights and tokenizer spec stored at ``path``, in any format ``load_model``
    reads, with every weight checked to be finite. No model is built. Without ``weights``, the
    weights are left unread (an empty dict): a quick look at what the file holds."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file {path} not found: give {ACCEPTED}")
    if path.is_dir():
        config, state_dict, tokenizer = _read_hf_folder(path, weights)
    else:
        with path.open("rb") as file:
            head = file.read(9)
        # safetensors: an 8-byte header length, then a JSON header. Checked first: the length
        # can start with the byte that starts a pickle. Byte 8 is never "{" in torch's formats.
        if head[8:9] == b"{":
            config, state_dict, tokenizer = _read_safetensors(path, weights)
        elif head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
            if weights:
                config, state_dict, tokenizer = read_training_checkpoint(path)
            else:  # the summary maps the file and reads no tensor
                summary = training_checkpoint_summary(path)
                config, state_dict, tokenizer = summary.config, {}, summary.tokenizer
        else:
            raise ValueError(f"{path} is not a model file llm knows: give {ACCEPTED}")
    # Training stops at the first NaN loss and keeps the last good checkpoint, so weights that
    # are not finite come from a damaged file; sampling from them would fail deep in torch. A
    # sum is NaN or infinite if any value is, and 15x faster than isfinite() (35 ms for GPT-2).
    broken = [
        name
        for name, weight in state_dict.items()
        if not weight.sum(dtype=torch.float32).isfinite()
    ]
    if broken:
        raise ValueError(
            f"{path}: {len(broken)} of the model's weight tensors, such as {broken[0]}, hold NaN "
            "or infinite values; is the file corrupt? Give another model file"
        )
    return config, state_dict, tokenizer


def _check_device(device: torch.device | str) -> None:
    """Refuse, before the file is read, a device that this machine or torch build lacks."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, TypeError) as err:  # torch raises each for some
        raise ValueError(
            f"device {str(device)!r} cannot be used here ({first_line(err)}); use 'cpu' or "
            "a device this machine has"
        ) from None


def load_model_and_tokenizer(
    path: str | Path,
    device: torch.device | str = "cpu",
    tokenizer_path: str | None = None,
    tokenizer_options: TokenizerOptions = MODEL_NAMED,
) -> tuple[GPT, Tokenizer]:
    """``load_model``, with the tokenizer the model names loaded (from ``tokenizer_path``, a
    local ranks file, when given: offline, a GPT-2 model's tokenizer cannot be downloaded) and
    checked to have the model's vocabulary. ``tokenizer_options`` names the setting that gives
    ``tokenizer_path`` in errors: generate.py's ``tokenizer.path`` by default."""
    model, spec = load_model(path, device)
    if tokenizer_path is not None:
        spec = {**spec, "path": tokenizer_path}
    tokenizer = load_tokenizer(**spec, options=tokenizer_options)
    fix = "name the tokenizer the model was trained with"
    check_vocabulary(path, model.config.vocab_size, tokenizer, fix)
    return model, tokenizer


def check_vocabulary(path: str | Path, vocab_size: int, tokenizer: Tokenizer, fix: str) -> None:
    """Refuse ``tokenizer`` for the model stored at ``path`` unless it has the model's
    ``vocab_size``, with ``fix`` as what to do instead."""
    if tokenizer.vocab_size == vocab_size:
        return
    # A Hugging Face folder that names no tokenizer is taken to use GPT-2's.
    where = (
        f' (in its config.json as "{HF_TOKENIZER_KEY}": {{"name": ..., "path": ...}})'
        if Path(path).is_dir()
        else ""
    )
    raise ValueError(
        f"{path}: the model has a vocabulary of {vocab_size} tokens, but the tokenizer "
        f"{tokenizer.name!r} has {tokenizer.vocab_size}; {fix}{where}"
    )


def save_model(model: GPT, path: str | Path, tokenizer: dict[str, Any]) -> None:
    """Save ``model`` as one safetensors file that ``load_model`` reads, with its config and
    the tokenizer spec ``tokenizer`` (``{"name": ..., "path": ...}``) in the metadata."""
    _check_tokenizer_to_save(tokenizer)
    check_file(path, "save_model's path")
    state_dict = _weights(model)
    metadata = {
        "format": "pt",
        "config": json.dumps(model.config.to_dict()),
        "tokenizer": json.dumps(tokenizer),
    }
    with atomic_path(Path(path)) as tmp:
        save_file(state_dict, tmp, metadata)


def save_hf(
    model: GPT,
    folder: str | Path,
    eot_token: int | None = None,
    tokenizer: dict[str, Any] | None = None,
) -> None:
    """Export ``model`` as a Hugging Face GPT-2 folder (``config.json`` and
    ``model.safetensors``) that ``transformers.GPT2LMHeadModel.from_pretrained`` loads;
    ``eot_token`` becomes its end-of-sequence token. A ``tokenizer`` spec other than GPT-2's
    (``{"name": ..., "path": ...}``, as ``load_model`` returns it) goes into ``config.json`` as
    ``llm_tokenizer``, which llm loads the folder with and transformers keeps as an attribute.
    Models with options GPT-2 lacks (grouped-query attention, RoPE, sliding windows) raise a
    ValueError before anything is written."""
    check_exportable(model.config)
    if tokenizer is not None:
        _check_tokenizer_to_save(tokenizer)
    check_folder(folder, "save_hf's folder")
    folder = Path(folder)
    for name in ("model.safetensors", "config.json"):
        if (folder / name).is_dir():
            raise ValueError(f"cannot write {folder / name}: it is a folder; move it away")
    weights = to_hf_state_dict(_weights(model), model.config)
    hf_config = to_hf_config(model.config, eot_token)
    if tokenizer is not None and tokenizer != GPT2_TOKENIZER:
        hf_config[HF_TOKENIZER_KEY] = dict(tokenizer)
    config = json.dumps(hf_config, indent=2)
    # The two as a pair (atomic_paths): weights of one model under the config of another would
    # not load. transformers only reads safetensors files whose metadata says they hold torch
    # tensors.
    pair = (folder / "model.safetensors", folder / "config.json")
    with atomic_paths(*pair) as (weights_tmp, config_tmp):
        save_file(weights, weights_tmp, {"format": "pt"})
        config_tmp.write_text(config + "\n")


def read_training_checkpoint(
    path: str | Path,
) -> tuple[GPTConfig, dict[str, Tensor], dict[str, Any]]:
    """The model config, GPT weights and tokenizer spec of a Lightning checkpoint written by
    llm's training. Anything else raises a one-line ValueError that names what to give."""
    path = Path(path)
    checkpoint = _load_training_checkpoint(path, ACCEPTED)
    # The LightningModule holds the GPT as ``self.model`` (wrapped under trainer=fsdp; in
    # checkpoints of versions that compiled the whole GPT, as ``model._orig_mod``). Other
    # entries are not the model's. The weights are copied out of the mapped file: the model
    # must not change if the file does.
    state_dict = {
        own_parameter_name(name.removeprefix("model.")): tensor.clone()
        for name, tensor in checkpoint["state_dict"].items()
        if name.startswith("model.")
    }
    config, tokenizer = _described_model(checkpoint["hyper_parameters"], path)
    return config, state_dict, tokenizer


class CheckpointSummary(NamedTuple):
    """What a training checkpoint says about the run that wrote it, for checks before resuming."""

    config: GPTConfig
    tokenizer: dict[str, Any]
    step: int  # optimizer steps taken
    batches: int | None  # micro-batches taken (Lightning's loop state), None without it
    resumable: bool  # holds the optimizer's and the loops' state, not only the weights


def training_checkpoint_summary(path: str | Path, wanted: str = ACCEPTED) -> CheckpointSummary:
    """The ``CheckpointSummary`` of a training checkpoint: none of its tensors is read. Raises
    like ``read_training_checkpoint``, asking for ``wanted``."""
    path = Path(path)
    checkpoint = _load_training_checkpoint(path, wanted)
    config, tokenizer = _described_model(checkpoint["hyper_parameters"], path)
    loops = checkpoint.get("loops") or {}
    progress = loops.get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    batches = progress.get("total", {}).get("ready")
    return CheckpointSummary(
        config=config,
        tokenizer=tokenizer,
        step=int(checkpoint.get("global_step", 0)),
        batches=batches,
        resumable=bool(loops) and "optimizer_states" in checkpoint,
    )


def _described_model(
    hyper_parameters: dict[str, Any], path: Path
) -> tuple[GPTConfig, dict[str, Any]]:
    """The model config and tokenizer spec a training checkpoint's hyperparameters hold."""
    return (
        _config(hyper_parameters["model"], path),
        _tokenizer_spec(hyper_parameters["tokenizer"], path),
    )


def _load_training_checkpoint(path: Path, wanted: str) -> dict[str, Any]:
    """The checkpoint dict, its tensors memory-mapped where the format allows: they are read
    only when used, and the optimizer state not at all."""
    if not path.is_file():
        raise FileNotFoundError(f"training checkpoint {path} not found: give {wanted}")
    with path.open("rb") as file:
        head = file.read(len(ZIP_MAGIC))
    zipped = head == ZIP_MAGIC
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):  # text, or another format altogether
        raise ValueError(
            f"{path} is not a file torch.save wrote, so no training checkpoint: give {wanted}"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as err:  # torch.load raises whatever the unpickler or zip reader raises
        # torch's zip errors go on for a paragraph, some after a tag of its C++ source.
        reason = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", first_line(err))
        reason = reason.split(". ")[0]
        raise ValueError(
            f"{path} could not be read as a training checkpoint ({reason}); is it truncated "
            f"or corrupt? Give {wanted}"
        ) from None
    hyper_parameters = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if (
        not isinstance(hyper_parameters, dict)
        or not isinstance(checkpoint.get("state_dict"), dict)
        or not {"model", "tokenizer"} <= hyper_parameters.keys()
    ):
        raise ValueError(
            f"{path} is not an llm training checkpoint: it needs a state_dict and "
            f"hyper_parameters with 'model' and 'tokenizer'. Give {wanted}"
        )
    for name, value in checkpoint["state_dict"].items():
        if not isinstance(value, Tensor):
            raise ValueError(
                f"{path} holds {type(value).__name__} {name} in its state_dict, where a "
                "tensor belongs; is it corrupt?"
            )
    return checkpoint


def _read_safetensors(
    path: Path, weights: bool
) -> tuple[GPTConfig, dict[str, Tensor], dict[str, Any]]:
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            # safe_open has keys() but cannot be iterated: `for name in file` would fail.
            names = file.keys() if weights else []
            state_dict = {name: file.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}); is it corrupt?"
        ) from None
    if "config" not in metadata or "tokenizer" not in metadata:
        raise ValueError(
            f"{path} is a safetensors file without llm's config and tokenizer metadata; save "
            f"models with llm.checkpoint.save_model, or give {ACCEPTED}"
        )
    try:
        fields, tokenizer = json.loads(metadata["config"]), json.loads(metadata["tokenizer"])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} holds unreadable metadata ({err}); is it corrupt?") from None
    return _config(fields, path), state_dict, _tokenizer_spec(tokenizer, path)


def _read_hf_folder(
    folder: Path, weights: bool
) -> tuple[GPTConfig, dict[str, Tensor], dict[str, Any]]:
    config_file, weights_file = folder / "config.json", folder / "model.safetensors"
    if missing := [file.name for file in (config_file, weights_file) if not file.is_file()]:
        raise ValueError(f"{folder} is a folder without {' and '.join(missing)}; give {ACCEPTED}")
    try:
        hf_config = json.loads(config_file.read_text())
        hf_state = load_file(weights_file) if weights else {}
    except (json.JSONDecodeError, SafetensorError, OSError) as err:
        raise ValueError(
            f"{folder} holds an unreadable GPT-2 model ({err}); is it corrupt?"
        ) from None
    if not isinstance(hf_config, dict):
        raise ValueError(f"{config_file} holds no GPT-2 config (a JSON object); is it corrupt?")
    try:
        config = from_hf_config(hf_config)
        state_dict = from_hf_state_dict(hf_state, config) if weights else {}
    except ValueError as err:
        raise ValueError(f"{folder}: {err}") from None
    tokenizer = hf_config.get(HF_TOKENIZER_KEY, GPT2_TOKENIZER)  # GPT-2's, unless llm saved one
    return config, state_dict, _tokenizer_spec(tokenizer, config_file)


def _config(fields: dict[str, Any], source: Path) -> GPTConfig:
    try:
        return GPTConfig(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source} holds a model config llm cannot use: {err}") from None


def _is_tokenizer_spec(spec: Any) -> bool:
    """Whether ``spec`` is ``load_tokenizer``'s arguments: ``{"name": str, "path": str | None}``."""
    return (
        isinstance(spec, dict)
        and not spec.keys() - {"name", "path"}
        and isinstance(spec.get("name"), str)
        and isinstance(spec.get("path"), str | None)
    )


# The keys of a tokenizer spec given to save_model and save_hf, for the fixes errors suggest.
SPEC_KEYS = TokenizerOptions(name="tokenizer['name']", path="tokenizer['path']")


def _check_tokenizer_to_save(spec: Any) -> None:
    """Refuse, before anything is written, a tokenizer spec that loading would refuse."""
    if not _is_tokenizer_spec(spec):
        raise ValueError(
            f"tokenizer must be a spec such as {GPT2_TOKENIZER!r}, as load_model returns it, "
            f"got {spec!r}"
        )
    check_tokenizer_spec(spec["name"], spec.get("path"), SPEC_KEYS)


def _tokenizer_spec(spec: Any, source: Path) -> dict[str, Any]:
    """The ``load_tokenizer`` arguments a model file names, checked."""
    if not _is_tokenizer_spec(spec):
        raise ValueError(
            f"{source} names its tokenizer as {spec!r}, not as {{'name': ..., 'path': ...}}; "
            "is it corrupt?"
        )
    return dict(spec)


def model_from_weights(config: GPTConfig, state_dict: dict[str, Tensor], source: str | Path) -> GPT:
    """A GPT with ``config`` whose weights are exactly ``state_dict``'s, as float32 and on their
    device (the position tables of RoPE are made on the CPU). ``source`` names where the weights
    came from in the ValueError raised when they do not fit the config."""
    # On the meta device the model allocates no memory and skips its random initialisation,
    # which would take most of the load time for the large GPT-2s: every weight comes from the
    # file instead.
    with torch.device("meta"):
        model = GPT(config)
    expected = model.state_dict()
    if config.tie_embeddings:  # the LM head is the token embedding: stored once, or ignored
        expected.pop("lm_head.weight")
        state_dict = {name: t for name, t in state_dict.items() if name != "lm_head.weight"}
    problems = [f"missing {name}" for name in expected if name not in state_dict]
    problems += [f"unexpected {name}" for name in state_dict if name not in expected]
    problems += [
        f"{name} has shape {tuple(state_dict[name].shape)}, not {tuple(want.shape)}"
        for name, want in expected.items()
        if name in state_dict and state_dict[name].shape != want.shape
    ]
    problems += [  # cast to float32 below, integers or booleans would pass as weights
        f"{name} holds {t.dtype}, not floating-point numbers"
        for name, t in state_dict.items()
        if name in expected and not t.is_floating_point()
    ]
    if problems:
        raise ValueError(
            f"{source}: the weights do not fit the model's config ({problems[0]}"
            + (f"; {len(problems)} problems in all)" if len(problems) > 1 else ")")
        )
    weights = {name: tensor.float() for name, tensor in state_dict.items()}
    model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()  # assign=True gave each module its own parameter object
    for module in model.modules():  # buffers derived from the config are not in the file
        if isinstance(module, RotaryEmbedding):
            module.reset_buffers()
    return model


def _weights(model: GPT) -> dict[str, Tensor]:
    """The model's weights on the CPU under the GPT's own names (a torch.compile'd GPT's too),
    each stored once (safetensors refuses shared tensors)."""
    state_dict = {own_parameter_name(name): tensor for name, tensor in model.state_dict().items()}
    if model.config.tie_embeddings:
        del state_dict["lm_head.weight"]
    return {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
