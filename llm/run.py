"""Turn a Hydra config (``configs/train.yaml``) into a training run: check it, build the
datamodule, module, callbacks, logger and trainer, and fit."""

from __future__ import annotations

import atexit
import logging
import os
import re
import shlex
import shutil
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import fields, replace
from inspect import signature
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning.fabric.plugins.environments import (
    LSFEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, read_write
from omegaconf.errors import InterpolationResolutionError

from llm.callbacks import AtomicCheckpointIO, GracefulStop, InspectionLogger
from llm.checkpoint import (
    ACCEPTED,
    check_vocabulary,
    model_from_weights,
    read_model_file,
    training_checkpoint_summary,
)
from llm.checks import (
    BOOLEAN,
    INTEGER,
    NUMBER,
    OPTIONAL_NUMBER,
    Check,
    check_known_keys,
    check_values,
    non_negative,
    positive,
)
from llm.data import check_output_folder, check_source
from llm.errors import Terminated, ctrl_c_as_interrupt, one_line_errors, quoting_fix
from llm.files import check_folder
from llm.hardware import has_fast_bf16
from llm.model import GPT, PRESETS, GPTConfig
from llm.tokenizer import Tokenizer
from llm.training import (
    COMPILE_MODES,
    LOGGED_METRICS,
    check_same_model,
    config_differences,
    described,
)

log = logging.getLogger(__name__)
RESUMABLE = "a last.ckpt or best.ckpt written by scripts/train.py"
# What configs/train.yaml and its groups hold at the top; build reads nothing else there.
RUN_SETTINGS = [
    "seed",
    "ckpt_path",
    "init_from",
    "tokenizer",
    "model",
    "data",
    "module",
    "trainer",
    "logger",
    "callbacks",
]

# The datamodule's settings that are the run's (data.<key>: the setting it comes from), passed
# in by ``build``: a tokenizer or window length of the data's own would not be the model's.
DATA_FROM_RUN = {
    "tokenizer_name": "tokenizer.name",
    "tokenizer_path": "tokenizer.path",
    "context_length": "model.context_length",
}
# What Lightning's DDP launcher sets in its own process's environment for the ranks it starts.
LAUNCHER_ENVIRONMENT = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "OMP_NUM_THREADS",
)

# Lines Lightning logs that say nothing about the run: an advertisement, its notice that it
# adds no model summary of its own beside llm's, and a "graceful shutdown" on a Ctrl-C that
# GracefulStop did not take (the script says "interrupted", or where the stop saved).
LIGHTNING_NOISE = (
    "litlogger",
    "litmodels",
    "already configured with model summary callbacks",
    "Detected KeyboardInterrupt",
)


def lightning_noise_filter(record: logging.LogRecord) -> bool:
    """False for a log line of ``LIGHTNING_NOISE``: a filter for Lightning's logger."""
    return not any(phrase in record.getMessage() for phrase in LIGHTNING_NOISE)


def quiet_lightning() -> None:
    """Silence warnings and log lines every run would print but that say nothing about it."""
    # A run resumed mid-epoch resumes its dataloader too: the datamodule starts the loader at
    # the restored step (llm.datamodule.TokenDataModule).
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
    # A run resumed in a new folder, as it is by default: its best.ckpt starts there afresh, and
    # the earlier run's stays in the earlier folder. Or resumed in its own folder, as the stop
    # message says: the checkpoints there are the ones it continues (a new run is refused).
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Lightning's advice, in DDP, to log the validation metrics with sync_dist=True: they come
    # from sums over every rank's tokens already (torchmetrics' SumMetric), and would average
    # equal numbers. A new val/ metric that is not must be synced itself.
    warnings.filterwarnings(
        "ignore", message=r"It is recommended to use `self.log\('(val/|hp_metric)"
    )
    # Lightning's advice to give the DataLoader workers on a machine with many cores: a batch is
    # a slice of memory-mapped tokens (1.5 ms for 64 x 1024 tokens on a slow CPU core), cut while
    # the GPU still runs the step before. Workers would pay off only for a costly dataset.
    warnings.filterwarnings("ignore", message=r"The '\w+' does not have many workers")
    # A deprecation inside Lightning, under newer torch.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lightning_noise_filter)


def register_model_presets() -> None:
    """Make every ``llm.model.PRESETS`` entry a choice of the ``model`` config group, typed by
    ``GPTConfig``: ``model=gpt2``, ``model.n_layer=6``, and ``model.n_layer=six`` fails."""
    store = ConfigStore.instance()
    for name, config in PRESETS.items():
        node = OmegaConf.structured(config)  # typed like GPTConfig; GPTConfig checks values later
        OmegaConf.set_readonly(node, False)  # frozen dataclass, but overrides must still apply
        store.store(group="model", name=name, node=node)


# What Lightning's Trainer takes as precision (its _PRECISION_INPUT), and llm's auto.
PRECISIONS = (
    *("auto", "bf16-mixed", "16-mixed", "32-true", "bf16-true", "16-true", "64-true"),
    *("transformer-engine", "transformer-engine-float16", "bf16", "16", "32", "64", 16, 32, 64),
)


def devices_setting(value: Any) -> bool:
    """A test for ``trainer.devices``: a number of devices, -1 (all), auto, or device ids as a
    list or a string ("0,1")."""
    if isinstance(value, int):
        return value > 0 or value == -1
    if isinstance(value, str):
        return value == "auto" or re.fullmatch(r"-1|\d+(,\d+)*,?", value) is not None
    return bool(value) and all(type(i) is int and i >= 0 for i in value)


# Every number the run depends on, checked before anything is built. The data's and the
# module's seeds are the run's (${seed}) unless set apart.
CHECKS: list[Check] = [
    *(
        (key, INTEGER, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")
        for key in ("seed", "data.seed", "module.seed")
    ),
    ("trainer.max_steps", INTEGER, positive, "a positive integer"),
    ("trainer.val_check_interval", INTEGER, positive, "a positive integer (steps)"),
    ("trainer.log_every_n_steps", INTEGER, positive, "a positive integer"),
    (
        "trainer.limit_val_batches",
        (int, float, type(None)),
        lambda v: v is None or (v >= 0 if isinstance(v, int) else 0 <= v <= 1),
        "null (every batch), a number of batches, or a fraction in [0, 1]",
    ),
    ("trainer.accumulate_grad_batches", INTEGER, positive, "a positive integer"),
    ("trainer.num_nodes", INTEGER, positive, "a positive integer"),
    (
        "trainer.check_val_every_n_epoch",
        (type(None),),
        lambda v: True,
        "null (the run is one endless epoch, validated every trainer.val_check_interval steps)",
    ),
    (
        "trainer.devices",
        (int, str, Sequence),
        devices_setting,
        "a number of devices, -1 (all), auto, or device ids such as [0,1]",
    ),
    (
        "trainer.precision",
        (int, str),
        lambda v: v in PRECISIONS,
        "auto, bf16-mixed, 16-mixed, 32-true or another of Lightning's precisions",
    ),
    (
        "trainer.gradient_clip_val",
        OPTIONAL_NUMBER,
        lambda v: v is None or v >= 0,
        "null or 0 (no clipping), or a positive number",
    ),
    ("data.batch_size", INTEGER, positive, "a positive integer"),
    ("data.num_workers", INTEGER, non_negative, "a non-negative integer"),
    ("data.val_fraction", NUMBER, lambda v: 0 < v < 1, "a number between 0 and 1"),
    ("module.learning_rate", NUMBER, positive, "a positive finite number"),
    ("module.min_lr", NUMBER, non_negative, "a non-negative finite number"),
    ("module.warmup_steps", INTEGER, non_negative, "a non-negative integer"),
    ("module.weight_decay", NUMBER, non_negative, "a non-negative finite number"),
    ("module.check_finite_every", INTEGER, positive, "a positive integer (steps)"),
    (
        "module.betas",
        (Sequence,),
        lambda v: len(v) == 2 and all(type(b) in NUMBER and 0 <= b < 1 for b in v),
        "two numbers in [0, 1), e.g. [0.9,0.95]",
    ),
    (
        "module.compile_mode",
        (str,),
        lambda v: v in COMPILE_MODES,
        "one of " + ", ".join(COMPILE_MODES),
    ),
    # A string such as "no" would count as true.
    *(
        (key, BOOLEAN, lambda v: True, "true or false")
        for key in (
            "module.compile_model",
            "trainer.enable_progress_bar",
            "trainer.enable_model_summary",
        )
    ),
    (
        "trainer.deterministic",
        (bool, str, type(None)),
        lambda v: v in (True, False, "warn", None),
        "true, false, warn or null",
    ),
]

PROGRESS_BAR_CHECK: Check = (
    "callbacks.progress_bar.refresh_rate",
    INTEGER,
    positive,
    "a positive integer (steps); trainer.enable_progress_bar=false hides the bar",
)


def tensorboard_logger_class(logger: Any) -> type | None:
    """The class of the ``logger`` config where it is a TensorBoardLogger (Lightning's, or a
    subclass); None for other loggers, none, or a target building it will report."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if not isinstance(logger, DictConfig):
        return None
    try:
        logger_class = get_class(str(logger.get("_target_")))
    except Exception:  # building the logger reports a target it cannot import
        return None
    is_tensorboard = isinstance(logger_class, type) and issubclass(logger_class, TensorBoardLogger)
    return logger_class if is_tensorboard else None


def check_tensorboard_logger_keys(logger: DictConfig, logger_class: type) -> None:
    """Refuse a key that the TensorBoardLogger ``logger_class`` does not take. It hands such keys
    to its SummaryWriter, which would refuse a misspelt one only when the run first logs, as a
    riddle ("you tried to log -1")."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.tensorboard import SummaryWriter

    takes = {  # but log_dir, which the logger sets itself
        name
        for taker in (logger_class, TensorBoardLogger, SummaryWriter)
        for name, parameter in signature(taker).parameters.items()
        if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    }
    check_known_keys(logger, takes - {"log_dir"} | {"_target_"}, "logger.")


def validate(cfg: DictConfig, warn: bool = True) -> None:
    """Fail before any work, with one line naming the key and the fix, on an impossible value;
    with ``warn``, log what is allowed but rarely meant."""
    check_known_keys(cfg, [*RUN_SETTINGS, "hydra"])  # Hydra's own, in a config it composed
    check_known_keys(cfg.tokenizer, ("name", "path"), "tokenizer.")
    check_model(cfg.model)
    check_values(cfg, CHECKS)
    for key, setting in DATA_FROM_RUN.items():
        if key in cfg.data:
            raise ValueError(f"data.{key} cannot be set: it is {setting}'s; set {setting}=...")
    monitor = OmegaConf.select(cfg, "callbacks.checkpoint.monitor")
    if monitor is not None and monitor not in LOGGED_METRICS:
        raise ValueError(
            f"callbacks.checkpoint.monitor={monitor} is no metric the run logs: use one of "
            + ", ".join(LOGGED_METRICS)
        )
    if OmegaConf.select(cfg, "callbacks.progress_bar") is not None:  # read only in training
        check_values(cfg, [PROGRESS_BAR_CHECK])
    if logger_class := tensorboard_logger_class(cfg.get("logger")):  # others check their own
        check_tensorboard_logger_keys(cfg.logger, logger_class)
    if not cfg.data.get("source"):
        raise ValueError(
            "data.source is not set: give a text file, a folder or a glob, "
            "e.g. data.source=path/to/corpus.txt"
        )
    source = str(cfg.data.source)  # data.source=2024 (a folder) comes as a number
    check_source(source)
    if cfg.module.min_lr > cfg.module.learning_rate:
        raise ValueError("module.min_lr must not exceed module.learning_rate.")
    runs_on = accelerator_type(cfg.trainer.accelerator)
    if runs_on == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"trainer.accelerator={cfg.trainer.accelerator} but torch sees no CUDA GPU here; "
            "use trainer=auto or trainer=cpu, or install a CUDA build of torch."
        )
    devices = cfg.trainer.devices
    # On the CPU, a count of processes, not GPU ids.
    if runs_on == "cpu" and not (devices == "auto" or str(devices).isdigit()):
        raise ValueError(
            f"trainer.devices={devices} is for GPUs, but this run is on the CPU: give a number "
            "of processes, e.g. trainer.devices=2"
        )
    if cfg.trainer.num_nodes > 1 and not started_on_every_node():
        raise ValueError(
            f"trainer.num_nodes={cfg.trainer.num_nodes}, but nothing starts the run on the other "
            "nodes, so it would wait for them forever: launch it on each node with torchrun or "
            "srun (see the README's 'Several GPUs and nodes'), or set MASTER_ADDR, MASTER_PORT "
            "and NODE_RANK on each"
        )
    if cfg.trainer.precision == "16-true":
        raise ValueError(
            "trainer.precision=16-true keeps the weights and AdamW's moments in fp16, where its "
            "small updates round to 0 or overflow: the loss turns NaN at once. Use 16-mixed or "
            "bf16-true"
        )
    if (ckpt_path := file_setting(cfg, "ckpt_path")) is not None:
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(
                f"ckpt_path={ckpt_path} does not exist or is a folder; give a .ckpt file"
                + read_as_value_hint(cfg, "ckpt_path")
            )
        # A truncated, foreign or unsafe file, or one of another model or tokenizer, fails here
        # in one line rather than in Lightning, and before any data is prepared. The vocabulary
        # is the tokenizer's, checked once it is loaded.
        check_resumable(Path(ckpt_path), cfg)
    elif cfg.init_from is not None:  # ignored by a resume, which restores its own weights
        check_initial_weights(cfg)
    if "data_dir" in cfg.data:  # fail now, not after the trainer is built
        # A folder named 2024 comes from the command line as a number, as data.source can.
        check_values(cfg, [("data.data_dir", (str, int), bool, "a folder for the prepared tokens")])
        check_output_folder(source, str(cfg.data.data_dir), "data.data_dir")
    # Allowed, but rarely what was meant; warned of once validate refuses nothing (what only
    # building the run can refuse, such as +module.foo=1, is reported after the warning).
    if warn and cfg.module.warmup_steps > cfg.trainer.max_steps:
        rank_zero_only(log.warning)(
            "module.warmup_steps=%d is more than trainer.max_steps=%d: the learning rate never "
            "reaches module.learning_rate",
            cfg.module.warmup_steps,
            cfg.trainer.max_steps,
        )


def started_on_every_node() -> bool:
    """Whether a launcher Lightning knows (torchrun, SLURM, LSF) started this process, or the
    environment gives this node its rank, as a run started by hand on each node must."""
    launchers = (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment)
    return any(env.detect() for env in launchers) or bool({"NODE_RANK", "RANK"} & os.environ.keys())


def check_resumable(ckpt_path: Path, cfg: DictConfig) -> None:
    """Refuse to resume from ``ckpt_path`` what this run could not continue exactly: a file that
    is no training checkpoint or holds only weights, another model or tokenizer, no steps left,
    or another gradient accumulation (Lightning counts validations and optimizer steps in
    micro-batches from the checkpoint's). The vocabulary is the tokenizer's, checked once it is
    loaded."""
    saved = training_checkpoint_summary(ckpt_path, RESUMABLE)
    if not saved.resumable:
        raise ValueError(
            f"ckpt_path={ckpt_path} holds the model's weights but not the optimizer's and the "
            f"loops' state a resume needs (saved with save_weights_only?): give {RESUMABLE}"
        )
    if saved.step >= cfg.trainer.max_steps:
        raise ValueError(
            f"ckpt_path={ckpt_path} is at step {saved.step}, so trainer.max_steps="
            f"{cfg.trainer.max_steps} leaves nothing to train; raise trainer.max_steps"
        )
    accumulate = cfg.trainer.accumulate_grad_batches
    if saved.step and saved.batches is not None and saved.batches != saved.step * accumulate:
        raise ValueError(
            f"ckpt_path={ckpt_path} took {saved.batches} micro-batches in {saved.step} steps, "
            f"this run would take {accumulate} a step; resume with "
            f"trainer.accumulate_grad_batches={saved.batches // saved.step}"
        )
    check_same_tokenizer(f"ckpt_path={ckpt_path}", saved.tokenizer, cfg.tokenizer, "resume")
    current = run_model_config(cfg, saved.config.vocab_size)
    check_same_model(saved.config.to_dict(), current.to_dict())


def run_model_config(cfg: DictConfig, vocab_size: int) -> GPTConfig:
    """The run's ``GPTConfig``: its ``model`` settings, with the tokenizer's vocabulary."""
    return GPTConfig(**{**OmegaConf.to_container(cfg.model), "vocab_size": vocab_size})


def file_setting(cfg: DictConfig, key: str) -> str | None:
    """The file the setting ``key`` names, or None. Hydra reads a name like 2024 from the
    command line as a number, which this gives back as text."""
    value = cfg.get(key)
    return None if value is None else str(value)


def read_as_value_hint(cfg: DictConfig, key: str) -> str:
    """For a file not found: how to quote its name where Hydra read the setting ``key`` as a
    number or a boolean, whose text may not be the name given (1e3 comes as 1000.0)."""
    if isinstance(cfg.get(key), str):
        return ""
    return f"; for a name like a number or true, {quoting_fix(key)}"


def check_same_tokenizer(
    setting: str, saved: dict[str, Any], tokenizer: DictConfig, action: str
) -> None:
    """Refuse a run whose tokenizer is not the one the model ``setting`` names was trained
    with (``saved``), naming that one's settings: "{action} with tokenizer.name=..."."""
    if saved["name"] == tokenizer.name:
        return
    fix = f"tokenizer.name={saved['name']}"
    if saved.get("path") != tokenizer.get("path"):
        fix += f" {tokenizer_path_setting(saved)}"
    raise ValueError(
        f"{setting} was trained with the tokenizer {saved['name']!r}, this run uses "
        f"{tokenizer.name!r}; {action} with {fix}"
    )


def tokenizer_path_setting(spec: dict[str, Any]) -> str:
    """The ``tokenizer.path`` override of a tokenizer spec: its ranks file, or null."""
    path = spec.get("path")
    return f"tokenizer.path={hydra_value(path) if path else 'null'}"


def check_initial_weights(cfg: DictConfig) -> None:
    """Refuse weights at ``init_from`` that this run could not start from: a file that is no
    model, another tokenizer, other model settings (but ``dropout`` and ``context_length``),
    or a ``context_length`` longer than a learned position table's. Only the file's config is
    read, not its weights; the vocabulary is the tokenizer's, checked once it is loaded
    (``start_from_weights``)."""
    init_from = file_setting(cfg, "init_from")
    if not init_from:
        raise ValueError(f"init_from is empty: give {ACCEPTED}, or null to start afresh")
    if not Path(init_from).exists():
        hint = read_as_value_hint(cfg, "init_from")
        raise FileNotFoundError(f"init_from={init_from} not found: give {ACCEPTED}{hint}")
    saved, _, tokenizer = read_model_file(init_from, weights=False)
    check_same_tokenizer(f"init_from={init_from}", tokenizer, cfg.tokenizer, "train")
    wanted = run_model_config(cfg, saved.vocab_size)
    shape = replace(saved, dropout=wanted.dropout, context_length=wanted.context_length)
    too_long = saved.pos_embedding == "learned" and wanted.context_length > saved.context_length
    if differences := config_differences(shape.to_dict(), wanted.to_dict()):
        # Quoted for the shell where needed: [256,null] is a glob pattern to zsh.
        fix = " ".join(
            shlex.quote(f"model.{key}={hydra_literal(value)}")
            for key, (value, _) in differences.items()
        )
        fix += f" model.context_length={saved.context_length}" if too_long else ""
        # A preset of that shape, for the reader to recognise (this run may name it already).
        run_settings = {
            key: getattr(shape, key) for key in ("vocab_size", "context_length", "dropout")
        }
        preset = next((n for n, p in PRESETS.items() if replace(p, **run_settings) == shape), None)
        found = described(differences, "in init_from's model")
        raise ValueError(
            f"init_from={init_from} holds another model ({found}); train it with {fix}"
            + (f" (the {preset} preset's shape)" if preset else "")
        )
    if too_long:
        raise ValueError(
            f"model.context_length={wanted.context_length} is longer than the "
            f"{saved.context_length} positions init_from={init_from} has learned: give "
            f"model.context_length={saved.context_length} or less"
        )


def start_from_weights(model: GPT, init_from: str, tokenizer: Tokenizer) -> None:
    """Give ``model`` the weights stored at ``init_from`` (any file ``load_model`` reads), to
    train on from them: fine-tuning. ``check_initial_weights`` has checked the file's config;
    here the weights are read, and the run's ``tokenizer`` must have their vocabulary. A
    shorter ``context_length`` keeps the first rows of a learned position table. Past those
    checks the file's config is the model's own, but for dropout and the context."""
    saved, weights, spec = read_model_file(init_from)
    # Named alike (check_initial_weights), so the ranks file differs.
    fix = f"train with the tokenizer the model was trained with, {tokenizer_path_setting(spec)}"
    check_vocabulary(init_from, saved.vocab_size, tokenizer, fix)
    if (positions := weights.get("position_embedding.weight")) is not None:
        weights["position_embedding.weight"] = positions[: model.config.context_length]  # (T, C)
    model.load_state_dict(model_from_weights(model.config, weights, init_from).state_dict())
    rank_zero_only(log.info)("starting from the weights in %s", init_from)


class RefuseEarlierRun(Callback):
    """A Hydra callback (``hydra.callbacks`` in configs/train.yaml) that refuses a new run, or
    sweep, in a folder where an earlier one left checkpoints: it would overwrite them. It runs
    before Hydra writes anything there, so the earlier run's config copy (``.hydra/``) stays as
    it was too."""

    # Hydra turns a callback's exception into a warning and goes on; a SystemExit stops it.
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with one_line_errors():
            check_no_earlier_run(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with one_line_errors():
            check_no_earlier_run(config, sweep=True)
            check_every_sweep_job(config, kwargs.get("config_name") or "train")


def check_every_sweep_job(sweep: DictConfig, config_name: str) -> None:
    """Check the config of every job of a ``--multirun`` sweep (as ``validate``) before the
    first job starts: a bad value in the last job would otherwise fail only when it starts,
    hours into the sweep. Only for Hydra's basic sweeper, which runs every combination of the
    sweep's values (``hydra.sweeper.params``, then the command line's), as it does here; other
    sweepers choose their jobs as they go. A job whose config refers to what exists only once
    it runs (``${hydra:runtime.cwd}``) is checked when it starts."""
    if not str(sweep.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper"):
        return
    # As given: an override's ${...} is resolved in its job's config, not in the sweep's.
    params = OmegaConf.to_container(sweep.hydra.sweeper, resolve=False).get("params") or {}
    given = [f"{key}={value}" for key, value in params.items()]
    given += OmegaConf.to_container(sweep.hydra.overrides.task, resolve=False)
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().hydra.config_loader)
    overrides = parser.parse_overrides(given)
    swept = {o.get_key_element() for o in overrides if o.is_sweep_override()}
    (jobs,) = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    for number, job in enumerate(jobs):
        try:
            validate(compose(config_name=config_name, overrides=job), warn=False)
        except InterpolationResolutionError:
            continue
        except (ValueError, FileNotFoundError) as error:
            values = " ".join(o for o in job if o.split("=", 1)[0] in swept)
            raise ValueError(f"sweep job {number} ({values}): {error}") from None


def check_no_earlier_run(cfg: DictConfig, sweep: bool = False) -> None:
    """Raise a one-line ValueError if the run's folder (``hydra.run.dir``), or the sweep's
    (``hydra.sweep.dir``), holds checkpoints at any depth, unless this run resumes one of them
    (``ckpt_path``) or Lightning will (its SLURM requeue checkpoints, ``hpc_ckpt_*.ckpt``)."""
    setting = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    folder = Path(OmegaConf.select(cfg, setting)).absolute()
    ckpt_path = file_setting(cfg, "ckpt_path")
    if ckpt_path is not None and Path(ckpt_path).absolute().is_relative_to(folder):
        return  # the run goes on where it left off
    found = sorted(folder.rglob("*.ckpt")) if folder.is_dir() else []
    if not found or any(path.name.startswith("hpc_ckpt_") for path in found):
        return
    last = next((path for path in found if path.name == "last.ckpt"), found[0])
    names = ", ".join(str(path.relative_to(folder)) for path in found[:4])
    job_dir = folder / last.relative_to(folder).parts[0]
    resume = (
        f"a job with hydra.run.dir={hydra_value(str(job_dir))} ckpt_path={hydra_value(str(last))}"
        if sweep
        else f"it with ckpt_path={hydra_value(str(last))}"
    )
    raise ValueError(
        f"{folder} holds an earlier run's checkpoints ({names}{', ...' if len(found) > 4 else ''})"
        f", which this {'sweep' if sweep else 'run'} would overwrite: set another {setting}, or "
        f"resume {resume}"
    )


def check_model(model: DictConfig) -> None:
    """Refuse a model setting ``GPTConfig`` does not have or refuses, in the config's terms
    (``model.n_embd``), and a vocabulary size, which is the tokenizer's."""
    check_known_keys(model, [field.name for field in fields(GPTConfig)], "model.")
    if model.vocab_size != GPTConfig.vocab_size:  # every preset's; the tokenizer's replaces it
        raise ValueError(
            f"model.vocab_size={model.vocab_size} cannot be set: the vocabulary is the "
            "tokenizer's; leave model.vocab_size out and choose tokenizer.name or tokenizer.path"
        )
    try:
        GPTConfig(**OmegaConf.to_container(model))
    except ValueError as error:
        message = str(error).replace("GPTConfig.", "model.")
        raise ValueError(re.sub(r"\btry (\w+)=", r"try model.\1=", message)) from None


def validation_interval(trainer: DictConfig) -> int:
    """Lightning's ``val_check_interval``, which counts batches, from the config's, which counts
    optimizer steps like ``max_steps``: so validation and its checkpoints always fall between
    optimizer steps, where a resumed run can start exactly."""
    return trainer.val_check_interval * trainer.accumulate_grad_batches


def accelerator_type(accelerator: str) -> str:
    """What ``trainer.accelerator`` runs on: ``cuda`` (gpu, cuda, or auto with a GPU), ``cpu``
    (cpu, or auto without one), or the name given (tpu, mps)."""
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if accelerator == "gpu" else accelerator


def resolve_precision(precision: str | int, accelerator: str) -> str | int:
    """``auto`` -> ``bf16-mixed`` where the hardware runs bf16 fast, else ``32-true``."""
    if precision != "auto":
        return precision
    on_gpu = accelerator_type(accelerator) == "cuda"
    return "bf16-mixed" if has_fast_bf16("cuda" if on_gpu else "cpu") else "32-true"


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Check ``cfg`` and build from it the datamodule, the module and the trainer with its
    callbacks and logger. Nothing is prepared or trained yet."""
    validate(cfg)
    quiet_lightning()
    # DataLoader workers are seeded by each loader's own generator. Quiet: a "Seed set" line
    # would come before the one line of any error below.
    L.seed_everything(cfg.seed, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for any fp32 work

    datamodule = instantiate(
        cfg.data, **{key: OmegaConf.select(cfg, setting) for key, setting in DATA_FROM_RUN.items()}
    )
    # The tokenizer decides the vocabulary; the config is checked before any data is prepared.
    model_config = run_model_config(cfg, datamodule.vocab_size)
    # The checkpoints name the tokenizer's ranks file for generation, which may run elsewhere.
    tokenizer = OmegaConf.to_container(cfg.tokenizer)
    if tokenizer["path"] is not None:
        tokenizer["path"] = str(Path(tokenizer["path"]).resolve())
    module = instantiate(
        cfg.module, model=model_config.to_dict(), tokenizer=tokenizer, _convert_="all"
    )
    if cfg.init_from is not None and cfg.ckpt_path is None:  # a resume restores its own weights
        start_from_weights(module.model, file_setting(cfg, "init_from"), datamodule.tokenizer)
    # Lightning would report a file in the way only at the first save, after training, or as
    # a riddle ("you tried to log -1"). TensorBoard needs a folder (other loggers may not), as
    # text; checkpoints have a default one.
    if tensorboard_logger_class(cfg.get("logger")):
        check_values(cfg, [("logger.save_dir", (str,), bool, "a folder for the logs, as text")])
    for setting in ("logger.save_dir", "callbacks.checkpoint.dirpath"):
        if (folder := OmegaConf.select(cfg, setting)) is not None:
            check_folder(folder, setting)
    # ~callbacks leaves them all out, callbacks.<key>=null one of them.
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    for callback in callbacks:
        if isinstance(callback, InspectionLogger):
            callback.check_sample_prompt(datamodule.tokenizer, model_config.context_length)
    # Lightning refuses a bar callback it may not show, and would run a summary one anyway.
    if not cfg.trainer.enable_progress_bar:
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not cfg.trainer.enable_model_summary:
        callbacks = [c for c in callbacks if not isinstance(c, ModelSummary)]
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        precision=resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
        val_check_interval=validation_interval(cfg.trainer),
        callbacks=callbacks,
        # Without llm's (~callbacks.checkpoint), Lightning would add a checkpoint callback of its
        # own, saving into the logger's folder.
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        logger=instantiate(cfg.logger) if cfg.get("logger") else False,
        plugins=[AtomicCheckpointIO()],
    )
    return datamodule, module, trainer


@contextmanager
def discarded_if_refused(made_before_training: Callable[[], set[str]] = set) -> Iterator[None]:
    """Remove the run's folder if what runs inside fails while the folder holds only what Hydra
    wrote in it: its config copy (``.hydra/``) and an empty log. Hydra makes those before any
    llm code runs, so every run refused for a bad setting would leave such a folder behind. A
    folder that held anything more on entry (a rerun's, say) is left alone. Above it, only a
    dated folder that holds nothing else goes too (``outputs/<date>/``).

    ``made_before_training`` names, at the failure, what else the run itself made there while
    it has trained no step (the logger's folder, holding only the config it logged): a run whose
    data turn out unusable once Lightning prepares them leaves nothing either."""
    if not HydraConfig.initialized():
        yield
        return
    hydra_config = HydraConfig.get()
    folder = Path(hydra_config.runtime.output_dir).absolute()
    log_file = folder / f"{hydra_config.job.name}.log"
    written = {hydra_config.output_subdir, log_file.name}

    def only_what_hydra_wrote(also: Iterable[str] = ()) -> bool:
        return folder.is_dir() and {path.name for path in folder.iterdir()} <= written.union(also)

    fresh = only_what_hydra_wrote() and not (log_file.is_file() and log_file.stat().st_size)
    # Never the folder the run started in (hydra.run.dir=.), or one a link leads to.
    fresh = fresh and not folder.is_symlink() and not Path.cwd().is_relative_to(folder)
    try:
        yield
    except BaseException:
        if fresh and only_what_hydra_wrote(made_before_training()):
            shutil.rmtree(folder, ignore_errors=True)
            with suppress(OSError):  # one that holds another run's folder stays
                for above in dated_folders_above(folder, hydra_config):
                    above.rmdir()
        raise


def dated_folders_above(folder: Path, hydra_config: DictConfig) -> list[Path]:
    """The folders above a single run's ``folder`` that ``hydra.run.dir`` names by the time
    (``outputs/${now:%Y-%m-%d}/...``), innermost first: Hydra made them for the runs of that
    day. A sweep's folders hold its ``multirun.yaml``, and folders named otherwise may be the
    user's: none of those."""
    if hydra_config.mode != RunMode.RUN:
        return []
    template = Path(OmegaConf.to_container(hydra_config.run, resolve=False)["dir"])
    dated: list[Path] = []
    for part, above in zip(reversed(template.parts[:-1]), folder.parents, strict=False):
        if "${now:" not in part:
            break
        dated.append(above)
    return dated


def in_sweep() -> bool:
    """Whether this process runs a ``--multirun`` job."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def hydra_value(value: str) -> str:
    """``value`` as Hydra reads it back: quoted where a comma or the like would split it."""
    if re.fullmatch(r"[\w./:-]*", value):
        return value
    return "'" + value.replace("'", "\\'") + "'"


def hydra_literal(value: Any) -> str:
    """``value`` as an override gives it: ``null``, ``true``, ``1e+20``, ``[256,null]``, or as
    text."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_literal(item) for item in value) + "]"
    return hydra_value(str(value))


def job_command_line() -> list[str]:
    """The command line that runs this run, or this sweep job alone: the script, the config
    options given (``--config-name`` and the like), Hydra's own overrides but a sweep's, and
    the job's overrides."""
    options = get_args_parser().parse_args(sys.argv[1:])  # Hydra's parser, as in hydra.main
    config_options = [
        f"--{name.replace('_', '-')}={value}"
        for name in ("config_path", "config_name", "config_dir")
        if (value := getattr(options, name)) is not None
    ]
    # As given: ${...} in an override is the job's to resolve, when it runs.
    overrides = OmegaConf.to_container(HydraConfig.get().overrides, resolve=False)
    sweep_only = re.compile(r"[+~]*hydra(\.|/)(sweep|sweeper|launcher|mode)\b")
    hydra_overrides = [o for o in overrides["hydra"] if not sweep_only.match(o)]
    run_mode = ["hydra.mode=RUN"] if in_sweep() else []
    return [sys.argv[0], *config_options, *hydra_overrides, *run_mode, *overrides["task"]]


def resume_hint(checkpoint: Path) -> str:
    """The command that resumes from ``checkpoint``, which a signal's stop saved: this run's
    overrides (a sweep job's own, to resume it alone), its folder and the checkpoint."""
    replaced = re.compile(r"[+~]*(ckpt_path|hydra\.run\.dir)=")
    job = [o for o in job_command_line() if not replaced.match(o)]
    folder = HydraConfig.get().runtime.output_dir
    command = [
        *job,
        f"hydra.run.dir={hydra_value(folder)}",
        f"ckpt_path={hydra_value(str(checkpoint))}",
    ]
    return f"Resume this {'job' if in_sweep() else 'run'} with: python " + shlex.join(command)


@contextmanager
def sweep_job_launches_its_own_ranks() -> Iterator[None]:
    """Let Lightning's DDP launcher start the other ranks of one ``--multirun`` job, and the
    next job start its own.

    The launcher (Lightning's ``_hydra_subprocess_cmd``) starts each rank with this process's
    command line plus ``hydra.run.dir`` read from Hydra's config. In a sweep that command line
    is the whole sweep (with ``-m`` after the overrides, argparse even refuses the launcher's
    additions), and ``hydra.run.dir`` is not the job's folder; so while the job runs, they are
    the job's own. The launcher also leaves its environment, thread count and process group
    behind, and the next job would take them as its own and wait for ranks that have finished;
    so after the job they are undone. An error must end the sweep: Hydra would go on to the
    next job while this one's ranks still wait for this process.
    """
    if not in_sweep():
        yield
        return
    hydra_config = HydraConfig.get()
    command_line, threads = sys.argv, torch.get_num_threads()
    environment = {key: os.environ.get(key) for key in LAUNCHER_ENVIRONMENT}
    with read_write(hydra_config):  # Hydra sets each job's config afresh
        hydra_config.run.dir = hydra_config.runtime.output_dir
    sys.argv = job_command_line()

    def launched_ranks() -> bool:  # not when torchrun or SLURM started them
        return environment["LOCAL_RANK"] is None and "LOCAL_RANK" in os.environ

    try:
        yield
        if launched_ranks():
            torch.distributed.destroy_process_group()
    except Exception:
        if not launched_ranks():
            raise
        try:
            with one_line_errors():  # an expected error: in one line, and exit code 1
                raise
        except Exception:  # a bug: its traceback, and exit code 1
            log.exception("the job failed, so the sweep stops here")
            raise SystemExit(1) from None
    finally:
        sys.argv = command_line
        torch.set_num_threads(threads)
        for key, value in environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def destroy_gloo_process_group() -> None:
    """Destroy this process's Gloo process group (DDP on CPUs), if it has one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        dist.destroy_process_group()


def train(cfg: DictConfig) -> GracefulStop | None:
    """Build everything from ``cfg`` and fit. Returns the graceful-stop callback, which says
    whether a signal ended training and where its checkpoint went."""
    trainer: L.Trainer | None = None
    # Lightning destroys an NCCL process group at exit, but leaves a Gloo one to the end of the
    # process, where Gloo's worker threads can abort it (SIGABRT) while the interpreter is torn
    # down: a rank of a CPU run, seen on 2 busy cores. Destroyed at exit too, while the
    # interpreter still runs (registered once).
    atexit.unregister(destroy_gloo_process_group)
    atexit.register(destroy_gloo_process_group)

    def made_before_training() -> set[str]:  # the logger's folder, until a step has run
        root = getattr(trainer.logger, "root_dir", None) if trainer else None
        if root is None or trainer.global_step > 0:
            return set()
        return {Path(root).name}

    with discarded_if_refused(made_before_training):
        datamodule, module, trainer = build(cfg)
        if trainer.logger:
            trainer.logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        stop = next((c for c in trainer.callbacks if isinstance(c, GracefulStop)), None)
        try:
            with sweep_job_launches_its_own_ranks(), ctrl_c_as_interrupt():
                trainer.fit(
                    module,
                    datamodule=datamodule,
                    ckpt_path=file_setting(cfg, "ckpt_path"),
                    weights_only=True,
                )
        except SIGTERMException:  # Lightning's: a SIGTERM GracefulStop did not take
            if stop is None or stop.checkpoint_path is None:
                raise Terminated from None
        except KeyboardInterrupt:
            # A Ctrl-C that GracefulStop does not take (during data preparation, or a second
            # one). Once GracefulStop has saved, it is that stop; before, it exits as any
            # Ctrl-C does (130).
            if stop is None or stop.checkpoint_path is None:
                raise
    return stop
