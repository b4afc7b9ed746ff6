"""Turn a Hydra config (``configs/train.yaml``) into a training run: check it, build the
datamodule, module, callbacks, logger and trainer, and fit."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from llm.callbacks import AtomicCheckpointIO, GracefulStop
from llm.hardware import has_fast_bf16
from llm.model import PRESETS, GPTConfig

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}

# Lightning warns that a run resumed mid-epoch cannot resume its dataloader; ours can, since
# the datamodule starts the loader at the restored step (llm.data.TokenDataModule).
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")


def register_model_presets() -> None:
    """Make every ``llm.model.PRESETS`` entry a choice of the ``model`` config group, typed by
    ``GPTConfig``: ``model=gpt2``, ``model.n_layer=6``, and ``model.n_layer=six`` fails."""
    store = ConfigStore.instance()
    for name, config in PRESETS.items():
        node = OmegaConf.structured(config)  # typed like GPTConfig; GPTConfig checks values later
        OmegaConf.set_readonly(node, False)  # frozen dataclass, but overrides must still apply
        store.store(group="model", name=name, node=node)


def _positive(value: Any) -> bool:
    return value > 0


def _non_negative(value: Any) -> bool:
    return value >= 0


# (config key, expected type, test, what the test asks for)
CHECKS: list[tuple[str, type, Callable[[Any], bool], str]] = [
    ("seed", int, _non_negative, "a non-negative integer"),
    ("trainer.max_steps", int, _positive, "a positive integer"),
    ("trainer.val_check_interval", int, _positive, "a positive integer (steps)"),
    ("trainer.log_every_n_steps", int, _positive, "a positive integer"),
    ("trainer.accumulate_grad_batches", int, _positive, "a positive integer"),
    ("trainer.gradient_clip_val", float, _non_negative, "a non-negative number"),
    ("data.batch_size", int, _positive, "a positive integer"),
    ("data.num_workers", int, _non_negative, "a non-negative integer"),
    ("data.val_fraction", float, lambda v: 0 < v < 1, "a number between 0 and 1"),
    ("module.learning_rate", float, _positive, "a positive number"),
    ("module.min_lr", float, _non_negative, "a non-negative number"),
    ("module.warmup_steps", int, _non_negative, "a non-negative integer"),
    ("module.weight_decay", float, _non_negative, "a non-negative number"),
]


def validate(cfg: DictConfig) -> None:
    """Fail before any work, with one line naming the key and the fix, on an impossible value."""
    for key, kind, test, wanted in CHECKS:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
        # bool is an int in Python, and an int is a fine float.
        ok_type = isinstance(value, kind) and not isinstance(value, bool)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok_type = True
        if not ok_type or not test(value):
            raise ValueError(f"{key} must be {wanted}, got {value!r}; override it as {key}=...")
    if not cfg.data.get("source"):
        raise ValueError(
            "data.source is not set: give a text file, a folder or a glob, "
            "e.g. data.source=path/to/corpus.txt"
        )
    if cfg.module.min_lr > cfg.module.learning_rate:
        raise ValueError("module.min_lr must not exceed module.learning_rate.")
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist; give a .ckpt file.")


def resolve_precision(precision: str | int, accelerator: str) -> str | int:
    """``auto`` -> ``bf16-mixed`` where the hardware runs bf16 fast, else ``32-true``."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if has_fast_bf16("cuda" if on_gpu else "cpu") else "32-true"


def train(cfg: DictConfig) -> GracefulStop | None:
    """Build everything from ``cfg`` and fit. Returns the graceful-stop callback, which says
    whether a signal ended training and where its checkpoint went."""
    validate(cfg)
    L.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for any fp32 work

    datamodule = instantiate(cfg.data)
    # The tokenizer decides the vocabulary; the config is checked before any data is prepared.
    model_config = GPTConfig(
        **{**OmegaConf.to_container(cfg.model), "vocab_size": datamodule.vocab_size}
    )
    module = instantiate(
        cfg.module,
        model=asdict(model_config),
        tokenizer=OmegaConf.to_container(cfg.tokenizer),
        _convert_="all",
    )
    callbacks = [instantiate(callback) for callback in cfg.callbacks.values()]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        precision=resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
        callbacks=callbacks,
        logger=logger,
        plugins=[AtomicCheckpointIO()],
    )
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    return next((c for c in callbacks if isinstance(c, GracefulStop)), None)
