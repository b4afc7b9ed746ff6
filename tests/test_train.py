"""Training end to end: the real configs and entry point, on a tiny model and synthetic text."""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hydra
import lightning as L
import pytest
import torch
from conftest import two_at_a_time
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, InstantiationException, OverrideParseException
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.loggers import Logger
from lightning.pytorch.trainer.connectors import data_connector
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator, ScalarEvent
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torch.distributed.fsdp import FullyShardedDataParallel

from llm.callbacks import (
    AtomicCheckpointIO,
    BestAndLastCheckpoint,
    GPTSummary,
    GracefulStop,
    InspectionLogger,
    LossProgressBar,
    TokenThroughputMonitor,
    whole_model_on_rank_zero,
)
from llm.checkpoint import load_model, save_hf, save_model
from llm.data import DataError
from llm.datamodule import TokenDataModule
from llm.errors import composition_error, one_line_errors, refused_config
from llm.files import atomic_path
from llm.generate import generate_text
from llm.hardware import device_from_name, peak_flops, precision_dtype
from llm.inspect import model_attention_figures
from llm.model import GPT, GPTConfig
from llm.run import (
    RUN_SETTINGS,
    build,
    check_every_sweep_job,
    check_no_earlier_run,
    dated_folders_above,
    discarded_if_refused,
    hydra_value,
    quiet_lightning,
    register_model_presets,
    resolve_precision,
    resume_hint,
    train,
    validate,
)
from llm.tokenizer import load_tokenizer
from llm.training import (
    GPTLightningModule,
    NonFiniteLossError,
    config_differences,
    warmup_cosine,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

register_model_presets()

TINY = [
    "model=gpt-nano",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.context_length=32",
    "tokenizer.name=bytes",
    "data=text",
    "data.batch_size=8",
    "trainer=cpu",
    "trainer.precision=32",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.inspection.sample_tokens=8",
    "callbacks.throughput.window_size=2",
    "module.warmup_steps=2",
    "module.compile_model=false",  # compiling costs more than these few steps
]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Repetitive text: a tiny model learns it within seconds."""
    lines = [
        f"{name} said: the {thing} is {color}.\n"
        for name in ("Anna", "Ben", "Cleo")
        for thing in ("sky", "sea", "grass")
        for color in ("blue", "green")
    ]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(lines) * 40)
    return path


@pytest.fixture
def saves(monkeypatch) -> list[tuple[str, int]]:
    """The file name and step of each checkpoint saved from here on, in order."""
    saved: list[tuple[str, int]] = []
    save = AtomicCheckpointIO.save_checkpoint

    def recorded(self, checkpoint: dict[str, Any], path: str | Path, **options: object) -> None:
        saved.append((Path(path).name, checkpoint["global_step"]))
        save(self, checkpoint, path, **options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recorded)
    return saved


def tiny_overrides(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.source={corpus}", f"data.data_dir={run_dir.parent / 'data'}", *extra]


def compose_run(overrides: list[str], run_dir: Path) -> DictConfig:
    """The config `scripts/train.py` would see, with its Hydra run folder set to run_dir."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def train_tiny(corpus: Path, run_dir: Path, *extra: str) -> GracefulStop | None:
    """A tiny run in ``run_dir`` through ``llm.run.train`` and the real configs."""
    return train(compose_run(tiny_overrides(corpus, run_dir, *extra), run_dir))


def run_script(*overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *overrides],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def events_of(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return events


def last_scalar(run_dir: Path, tag: str) -> ScalarEvent:
    return events_of(run_dir).Scalars(tag)[-1]


def final_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("model.")}


class SignalAtStep(L.Callback):
    """Sends this process a signal (``times`` times) at the end of a given step, like a Ctrl-C
    or a scheduler."""

    def __init__(self, step: int, signum: int = signal.SIGINT, times: int = 1) -> None:
        self.step, self.signum, self.times = step, signum, times

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            for _ in range(self.times):
                signal.raise_signal(self.signum)


class SignalInFirstValidation(L.Callback):
    """Sends this process a Ctrl-C as the first validation of training starts."""

    sent = False

    def on_validation_batch_start(self, trainer, *args) -> None:
        if not self.sent:
            self.sent = True
            signal.raise_signal(signal.SIGINT)


class PoisonAtStep(L.Callback):
    """Sets the final norm's gains to ``value`` after a given step: NaN, as a diverging run
    would, or 0, which makes every prediction uniform (a worse loss, but finite)."""

    def __init__(self, step: int, value: float = float("nan")) -> None:
        self.step, self.value = step, value

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.final_norm.weight.fill_(self.value)


class RecordFirstBatch(L.Callback):
    """Saves each rank's first training batch, learning rate and a draw from torch's generator
    after it, its count of non-finite losses a step later (rank 1 adds one), and its first
    validation batch, next to the checkpoints."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            record = {
                "batch": batch[0].cpu(),
                "learning_rate": pl_module.learning_rate,
                "draw": torch.rand(8),
            }
            torch.save(record, Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.pt")
            pl_module.nonfinite_losses += trainer.global_rank  # as if rank 1 saw a NaN loss
        if batch_idx == 1:  # the count of its own, a step later; then none, for the run to go on
            count = pl_module.nonfinite_losses.clone()
            torch.save(count, Path(trainer.default_root_dir) / f"rank{trainer.global_rank}_nan.pt")
            pl_module.nonfinite_losses.zero_()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            path = Path(trainer.default_root_dir) / f"rank{trainer.global_rank}_val.pt"
            torch.save(batch[0].cpu(), path)


class FailOnRankZero(L.Callback):
    """Raises an unexpected error on rank 0 after the first step of a run with a given
    learning rate, as a bug would."""

    def __init__(self, learning_rate: float) -> None:
        self.learning_rate = learning_rate

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == 0 and pl_module.learning_rate == self.learning_rate:
            raise RuntimeError("a bug")


# --- the real entry point -------------------------------------------------------------------


@pytest.mark.slow
def test_train_script_writes_checkpoints_and_tensorboard(corpus, tmp_path):
    run_dir = tmp_path / "run"
    result = run_script(
        *tiny_overrides(corpus, run_dir, "trainer.enable_model_summary=true"),
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    output = result.stdout + result.stderr
    assert "GPT: 2 layers, 2 heads" in output  # llm's summary line, in place of Lightning's table
    for noise in ("Total FLOPs", "litlogger", "already configured with model summary"):
        assert noise not in output

    events = EventAccumulator(
        str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0}
    )
    events.Reload()
    tags = events.Tags()
    for scalar in ("train/loss", "train/lr", "val/loss", "val/perplexity"):
        assert scalar in tags["scalars"], tags["scalars"]
    assert any("items_per_sec" in tag for tag in tags["scalars"]), tags["scalars"]
    assert {"attention/layer_0", "attention/layer_1"} <= set(tags["images"])
    assert "sample/text_summary" in tags["tensors"]
    sample = events.Tensors("sample/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert len(sample.strip("`\n")) > 0
    # The HParams tab: the whole run config, flattened, beside the latest validation loss.
    session = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(session).session_start_info.hparams
    assert hparams["model/n_layer"].number_value == 2
    assert hparams["trainer/max_steps"].number_value == 6
    hp_metric = events.Scalars("hp_metric")
    assert hp_metric[-1].value == events.Scalars("val/loss")[-1].value
    # The last validation was the best: last.ckpt is a second name for best.ckpt's file.
    val_losses = [event.value for event in events.Scalars("val/loss")]
    assert val_losses[-1] == min(val_losses)
    assert (run_dir / "checkpoints" / "last.ckpt").samefile(run_dir / "checkpoints" / "best.ckpt")


@pytest.mark.slow
def test_bad_overrides_fail_in_one_line_before_any_work(tmp_path):
    # One case of each way a value is refused; test_settings_nothing_reads_and_bad_model_values_
    # _are_refused checks many more values, and test_hydras_refusals_become_one_line more of
    # Hydra's, in-process.
    a_file = tmp_path / "a-file"  # in the way of a folder
    a_file.write_text("")
    cases = {
        # Refused by Hydra while composing the config.
        "trainer.max_stepz=5": "Could not override 'trainer.max_stepz'. Key 'max_stepz' is not "
        "in struct. Did you mean trainer.max_steps? To append to your config use +trainer.max",
        "logger=null": "to leave a config group out, delete it: ~GROUP (e.g. ~logger)",
        # Refused by llm's checks.
        "data.batch_size=0": "data.batch_size must be a positive integer",
        # Refused by the classes the config builds, named by their config key.
        "+trainer.max_stepz=5": "trainer: Trainer.__init__() got an unexpected keyword argument",
        "trainer.strategy=nope": "trainer: You selected an invalid strategy name: `strategy='n",
        "callbacks.throughput.window_size=1": "callbacks.throughput: window_size must be a whole",
        f"logger.save_dir={a_file}": f"cannot write in {a_file} ({a_file} is not a folder): set "
        "logger.save_dir",
        "callbacks.throughput._target_=llm.Nothing": "callbacks.throughput: Error locating target",
    }
    run_dirs = [tmp_path / f"run-{number}" for number in range(len(cases))]
    runs = [
        ((override, f"hydra.run.dir={run_dir}"), message)
        for (override, message), run_dir in zip(cases.items(), run_dirs, strict=True)
    ]
    # Hydra makes the run's folder itself, before any llm code runs.
    hydra_fix = "log there: set hydra.run.dir= (hydra.sweep.dir= with --multirun) to a folder"
    runs.append(((f"hydra.run.dir={a_file / 'run'}",), hydra_fix))
    # Each in its own folder.
    results = two_at_a_time(lambda run: run_script("tokenizer.name=bytes", *run[0]), runs)
    for (overrides, message), result in zip(runs, results, strict=True):
        assert result.returncode == 1, overrides
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0], (overrides, result.stderr)
        assert "Traceback" not in result.stderr, (overrides, result.stderr)
        assert "Error executing job" not in result.stderr, (overrides, result.stderr)
    assert not any(run_dir.exists() for run_dir in run_dirs)  # Hydra's folders are gone again
    # A rerun where an earlier run left checkpoints is refused before Hydra writes there.
    earlier = tmp_path / "earlier"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's")
    (earlier / ".hydra").mkdir()
    (earlier / ".hydra" / "config.yaml").write_text("the earlier run's config")
    result = run_script("tokenizer.name=bytes", f"hydra.run.dir={earlier}")
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "holds an earlier run's checkpoints (checkpoints/last.ckpt)" in result.stderr
    assert sorted(p.name for p in earlier.iterdir()) == [".hydra", "checkpoints"]
    assert (earlier / ".hydra" / "config.yaml").read_text() == "the earlier run's config"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model=gpt3",
            "Could not find 'model/gpt3'. Available options: gpt-micro, gpt-micro-modern",
        ),
        ("trainer.max_steps=[", "Could not parse the override 'trainer.max_steps=['"),
        (  # text Hydra's parser refuses unquoted: the fix says how to quote it
            "data.source=Shakespeare's.txt",
            """If the value is text, put it in quotes, inside the shell's: 'data.source="..."'.""",
        ),
        ("model.n_layer=six", "Value 'six' of type 'str' could not be converted to Integer"),
        # At the top, where a key added with + is refused: not Hydra's "use +max_steps=5".
        (
            "max_steps=5",
            "Could not override 'max_steps'. Key 'max_steps' is not in struct. Did you mean "
            "trainer.max_steps?",
        ),
        (
            "zzz=5",
            "Could not override 'zzz'. Key 'zzz' is not in struct. The settings are callbacks, "
            "ckpt_path, data, init_from, logger, model, module, seed, tokenizer, trainer.",
        ),
        (  # Hydra's advice, key=\'a,b\', breaks on a space in the value
            "data.source=a, b",
            "Ambiguous value for argument 'data.source=a, b'. A comma makes a sweep, with "
            "--multirun, or a list (data.source=[a,b]). If the value is text, put it in "
            """quotes, inside the shell's: 'data.source="..."'.""",
        ),
    ],
)
def test_hydras_refusals_become_one_line(tmp_path, override, message):
    with pytest.raises((ConfigCompositionException, OverrideParseException)) as refused:
        compose_run([override], tmp_path)
    line = composition_error(refused.value)
    assert message in line and "+" not in line


class BrokenCallback(L.Callback):
    def __init__(self, size: int = 1) -> None:
        self.size = size + "1"  # a bug, not a bad config


def test_a_config_refused_is_one_line_but_a_bug_keeps_its_traceback():
    target = f"{__name__}.BrokenCallback"
    errors = []
    for config in ({"_target_": target, "sise": 2}, {"_target_": target}):
        with pytest.raises(InstantiationException) as caught:
            hydra.utils.instantiate(
                OmegaConf.create({"callbacks": {"broken": config}}).callbacks.broken
            )
        errors.append(refused_config(caught.value))
    assert errors[0] == (
        "callbacks.broken: BrokenCallback.__init__() got an unexpected keyword argument 'sise'"
    )
    assert errors[1] is None  # re-raised by one_line_errors, traceback and all


class NeedsAPackage:
    def __init__(self) -> None:  # as Lightning's Trainer for accelerator=tpu without torch_xla
        raise ModuleNotFoundError("Requirement 'torch_xla>=1.13' not met. HINT: pip install it")


def test_a_package_a_setting_needs_is_named_in_one_line():
    with pytest.raises(InstantiationException) as caught:
        hydra.utils.instantiate(
            OmegaConf.create({"trainer": {"_target_": f"{__name__}.NeedsAPackage"}}).trainer
        )
    assert refused_config(caught.value) == (
        "trainer: Requirement 'torch_xla>=1.13' not met. HINT: pip install it"
    )


def run_sweep(corpus: Path, sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``scripts/train.py --multirun`` of the tiny run with ``overrides``, into ``sweep_dir``."""
    return run_script(
        "--multirun", *tiny_overrides(corpus, sweep_dir, *overrides), f"hydra.sweep.dir={sweep_dir}"
    )


@pytest.mark.slow
def test_multirun_sweep_gives_each_run_its_own_folder(corpus, tmp_path):
    sweep_dir = tmp_path / "sweep"
    steps = ("trainer.max_steps=2", "trainer.val_check_interval=2")
    result = run_sweep(corpus, sweep_dir, *steps, "module.learning_rate=1e-3,2e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        assert (sweep_dir / job / "checkpoints" / "last.ckpt").is_file()
    learning_rates = [
        torch.load(sweep_dir / job / "checkpoints" / "last.ckpt", weights_only=True)[
            "hyper_parameters"
        ]["learning_rate"]
        for job in ("0", "1")
    ]
    assert learning_rates == [1e-3, 2e-3]


@pytest.mark.slow
def test_a_sweep_with_a_bad_job_fails_before_the_first_job(corpus, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_sweep(corpus, sweep_dir, "data.batch_size=4,0", "module.learning_rate=1e-3,2e-3")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: sweep job 2 (data.batch_size=0 module.learning_rate=0.001): data.batch_size must "
        "be a positive integer, got 0; override it as data.batch_size=..."
    )
    assert not sweep_dir.exists()  # no job ran


@pytest.mark.parametrize(
    ("params", "sweep", "error"),
    [
        ({}, ["module.min_lr=1e-4,5e-4", "module.learning_rate=${module.min_lr}"], None),
        ({}, ["data.data_dir=${hydra:runtime.cwd}/data", "data.batch_size=8,4"], None),
        ({}, ["model=glob(gpt-n*)", "data.batch_size=8,0"], "job 1 (model=gpt-nano data.bat"),
        ({"module.weight_decay": "0.1,-1"}, [], "job 1 (module.weight_decay=-1): module.weig"),
    ],
)
def test_a_sweeps_jobs_are_checked_as_hydras_basic_sweeper_makes_them(
    corpus, tmp_path, params, sweep, error
):
    # Each job's ${...} resolves in its own config (a job's hydra:runtime only as it runs), a
    # glob picks config options, and hydra.sweeper.params sweeps too.
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("train", overrides=tiny_overrides(corpus, tmp_path), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.sweeper.params = params
            cfg.hydra.overrides.task = [*tiny_overrides(corpus, tmp_path), *sweep]
        if error is None:
            check_every_sweep_job(cfg, "train")
        else:
            with pytest.raises(ValueError, match=re.escape(f"sweep {error}")):
                check_every_sweep_job(cfg, "train")


# --- training behaviour ---------------------------------------------------------------------


def validated_steps(run_dir: Path) -> list[int]:
    """The steps at which a run logged a validation loss (counted from 0)."""
    events = events_of(run_dir)
    if "val/loss" not in events.Tags()["scalars"]:
        return []
    return [event.step for event in events.Scalars("val/loss")]


@pytest.mark.slow
def test_loss_falls_by_half(corpus, tmp_path):
    run_dir = tmp_path / "run"
    train_tiny(
        corpus,
        run_dir,
        "trainer.max_steps=150",
        "trainer.val_check_interval=150",
        "module.learning_rate=3e-3",
    )
    final_val_loss = last_scalar(run_dir, "val/loss").value
    initial_loss = math.log(257)  # an untrained model guesses uniformly over the 257 byte tokens
    assert final_val_loss < 0.5 * initial_loss


@pytest.mark.slow
def test_validation_counts_optimizer_steps_and_ends_every_run(corpus, tmp_path):
    run_dir = tmp_path / "run"
    train_tiny(
        corpus,
        run_dir,
        "trainer.accumulate_grad_batches=2",
        "trainer.val_check_interval=2",
        "trainer.max_steps=5",
    )
    # After optimizer steps 2 and 4, between steps as a resumed run needs, and after the last
    # (logging steps count from 0).
    assert validated_steps(run_dir) == [1, 3, 4]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 5


def train_with_signal(
    corpus: Path, run_dir: Path, signum: int, step: int, *extra: str, times: int = 1
):
    """A tiny run that sends itself ``signum`` (``times`` times) at the end of ``step``."""
    cfg = compose_run(tiny_overrides(corpus, run_dir, *extra), run_dir)
    with open_dict(cfg):
        cfg.callbacks.signal = {"_target_": f"{__name__}.SignalAtStep", "step": step}
        cfg.callbacks.signal.signum = signum
        cfg.callbacks.signal.times = times
    return train(cfg)


# The signal lands after the step was checked, so the stop comes a step later: at step 2,
# before the first validation (step 3) has written any checkpoint; at step 3, a step that
# validates anyway; at step 5, between validations.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "step"), [(signal.SIGINT, 1), (signal.SIGINT, 2), (signal.SIGTERM, 4)]
)
def test_signal_saves_and_resume_equals_uninterrupted_run(corpus, tmp_path, signum, step):
    extra = ["trainer.max_steps=8", "model.dropout=0.1"]
    whole_dir, first_dir, second_dir = tmp_path / "whole", tmp_path / "first", tmp_path / "second"
    train_tiny(corpus, whole_dir, *extra)

    stopped = train_with_signal(corpus, first_dir, signum, step, *extra)
    assert stopped.signal_name == signal.Signals(signum).name
    interrupted = first_dir / "checkpoints" / "last.ckpt"
    assert stopped.checkpoint_path == interrupted
    assert torch.load(interrupted, weights_only=True)["global_step"] == step + 1
    # The stop validates only where a validation was due: best.ckpt comes from step 3's alone.
    checkpoints = sorted(p.name for p in interrupted.parent.iterdir())
    assert checkpoints == (["best.ckpt", "last.ckpt"] if step >= 2 else ["last.ckpt"])
    assert validated_steps(first_dir) == ([2] if step >= 2 else [])
    if step == 4:  # the stop saved last.ckpt anew, as a file of its own: best.ckpt is step 3's
        best = interrupted.parent / "best.ckpt"
        assert not best.samefile(interrupted)
        assert torch.load(best, weights_only=True)["global_step"] == 3

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # but for the warnings llm filters itself
        train_tiny(corpus, second_dir, *extra, f"ckpt_path={interrupted}")
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]  # a new folder
    whole = final_weights(whole_dir / "checkpoints" / "last.ckpt")
    resumed = final_weights(second_dir / "checkpoints" / "last.ckpt")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    for tag in ("train/loss", "val/loss"):
        whole_loss, resumed_loss = (last_scalar(d, tag) for d in (whole_dir, second_dir))
        assert whole_loss.step == resumed_loss.step == 7  # the 8th step: logs count from 0
        assert whole_loss.value == resumed_loss.value, tag
    # Between them, the two runs validated where the uninterrupted one did, and only there.
    assert validated_steps(first_dir) + validated_steps(second_dir) == validated_steps(whole_dir)
    # The throughput's running totals went on from the checkpoint's: 8 steps of 8 samples.
    samples = [last_scalar(d, "train/samples") for d in (whole_dir, second_dir)]
    assert [(s.step, s.value) for s in samples] == [(8, 64), (8, 64)]
    assert last_scalar(second_dir, "train/time").value > last_scalar(first_dir, "train/time").value


@pytest.mark.slow
def test_sigterm_sent_twice_still_saves_before_stopping(corpus, tmp_path):
    # `timeout` signals the process and then its group: one process can get two at once.
    stopped = train_with_signal(corpus, tmp_path / "run", signal.SIGTERM, 1, times=2)
    assert stopped.signal_name == "SIGTERM"
    assert stopped.checkpoint_path == tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(stopped.checkpoint_path, weights_only=True)["global_step"] == 2


@pytest.mark.slow
def test_a_signal_during_a_validation_is_heard_and_stops_training_after_it(
    corpus, tmp_path, caplog
):
    run_dir = tmp_path / "run"
    cfg = compose_run(tiny_overrides(corpus, run_dir, "trainer.max_steps=8"), run_dir)
    with open_dict(cfg):
        cfg.callbacks.signal = {"_target_": f"{__name__}.SignalInFirstValidation"}
    with caplog.at_level(logging.WARNING, logger="llm.callbacks"):
        stopped = train(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.name == "llm.callbacks"]
    assert warnings == ["SIGINT: stopping once this validation ends; Ctrl-C again stops at once"]
    assert stopped.checkpoint_path == run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(stopped.checkpoint_path, weights_only=True)["global_step"] == 4
    assert validated_steps(run_dir) == [2]  # the whole first validation, and no other


@pytest.mark.slow
def test_a_signal_at_the_last_step_lets_the_run_end_as_usual(corpus, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="llm.callbacks"):
        stopped = train_with_signal(
            corpus, tmp_path / "run", signal.SIGINT, 5, "trainer.max_steps=6"
        )
    warnings = [r.getMessage() for r in caplog.records if r.name == "llm.callbacks"]
    assert warnings == ["SIGINT: it came in the last step, and the run ends as planned"]
    assert stopped.checkpoint_path is None  # nothing to resume: no "Stopped by" message
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6
    assert validated_steps(tmp_path / "run") == [2, 5]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [RunMode.RUN, RunMode.MULTIRUN])
def test_the_resume_hint_runs_that_run_or_sweep_job_alone(corpus, tmp_path, monkeypatch, mode):
    job_dir = tmp_path / "sweep" / "1"
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # after the test, the one before
    job_overrides = ["module.learning_rate=0.002", "hydra.job.chdir=true"]
    job_overrides += ["module.min_lr=${module.learning_rate}"]  # resolved as the job runs
    job_overrides += ["hydra.sweep.dir=x"] if mode == RunMode.MULTIRUN else ["hydra.run.dir=y"]
    compose_run(tiny_overrides(corpus, job_dir, *job_overrides), job_dir)
    with read_write(HydraConfig.get()):
        HydraConfig.get().mode = mode
    # The command line gives the config options; the job's overrides come from Hydra.
    given = ["--config-name=train"]
    given += ["-m", "module.learning_rate=1e-3,2e-3"] if mode == RunMode.MULTIRUN else []
    monkeypatch.setattr(sys, "argv", ["scripts/train.py", *given])
    checkpoint = job_dir / "it's, quoted" / "last.ckpt"  # unquoted, Hydra would read a list
    hint = resume_hint(checkpoint)
    what = "job" if mode == RunMode.MULTIRUN else "run"
    prefix = f"Resume this {what} with: python scripts/train.py --config-name=train "
    assert hint.startswith(prefix)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        job = compose("train", overrides=shlex.split(hint[len(prefix) :]), return_hydra_config=True)
    assert job.module.learning_rate == 0.002  # the job's value, not the sweep's
    assert job.hydra.job.chdir  # Hydra's own settings too, but the sweep's
    assert "hydra.sweep.dir" not in hint and hint.count("hydra.run.dir=") == 1
    assert "'module.min_lr=${module.learning_rate}'" in hint
    assert ("hydra.mode=RUN" in hint) == (mode == RunMode.MULTIRUN)  # a sweep job runs alone
    assert job.hydra.run.dir == str(job_dir)
    assert job.ckpt_path == str(checkpoint)


def raise_in(owner: type, method: str, error: BaseException, monkeypatch) -> None:
    def raising(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr(owner, method, raising)


# Lightning answers a KeyboardInterrupt it sees (during data preparation, before GracefulStop
# listens, or a second Ctrl-C, say during the stop's save) with exit code 1, and ignores Ctrl-C
# from then on; train() raises it again, for 130, and never as a stop that saved.
@pytest.mark.slow
@pytest.mark.parametrize("during", ["preparation", "save"])
def test_a_ctrl_c_lightning_takes_is_an_interrupt(corpus, tmp_path, monkeypatch, during):
    if during == "preparation":
        raise_in(TokenDataModule, "prepare_data", KeyboardInterrupt(), monkeypatch)
    else:
        raise_in(L.Trainer, "save_checkpoint", KeyboardInterrupt(), monkeypatch)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_with_signal(corpus, tmp_path / "run", signal.SIGINT, 1)
    finally:
        signal.signal(signal.SIGINT, handler)


@pytest.mark.slow
def test_a_sigterm_lightning_takes_exits_143_or_is_the_stop_that_saved(
    corpus, tmp_path, monkeypatch
):
    raise_in(TokenDataModule, "prepare_data", SIGTERMException(), monkeypatch)
    with pytest.raises(SystemExit) as exit_info, one_line_errors():
        train_tiny(corpus, tmp_path / "run")
    assert exit_info.value.code == 143
    monkeypatch.undo()
    # A second SIGTERM, during the validation due at the stop (step 3), after the stop's save.
    raise_in(InspectionLogger, "on_validation_end", SIGTERMException(), monkeypatch)
    stopped = train_with_signal(corpus, tmp_path / "stopped", signal.SIGTERM, 2)
    assert stopped.checkpoint_path == tmp_path / "stopped" / "checkpoints" / "last.ckpt"


def test_a_sigterm_while_the_data_are_prepared_exits_143_leaving_no_files(
    corpus, tmp_path, monkeypatch, capsys
):
    def sigterm_halfway(*args: Any) -> None:  # as a scheduler would, while a token file is written
        with atomic_path(tmp_path / "data" / "train.bin") as temporary:
            temporary.write_bytes(b"half of the tokens")
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr("llm.datamodule.prepare", sigterm_halfway)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info, one_line_errors():  # as scripts/train.py
        train_tiny(corpus, tmp_path / "run")
    assert exit_info.value.code == 143
    assert capsys.readouterr().err == "interrupted\n"
    assert not (tmp_path / "data").exists()  # no temporary file, nor the folder made for it
    assert signal.getsignal(signal.SIGTERM) == handler


@pytest.mark.slow
def test_compiled_training_keeps_checkpoint_names_and_inspects_eagerly(corpus, tmp_path):
    run_dir = tmp_path / "run"
    train_tiny(corpus, run_dir, "module.compile_model=true", "trainer.max_steps=3")
    weights = final_weights(run_dir / "checkpoints" / "last.ckpt")
    assert "model.blocks.0.attn.qkv.weight" in weights
    assert not any("_orig_mod" in key for key in weights)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "attention/layer_0" in events.Tags()["images"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("check_finite_every", "poison_step", "found_in"),
    [
        (1, 4, "training loss"),
        (50, 4, "training loss"),  # the validation at step 6 checks the training losses
        (50, 6, "validation loss"),  # weights NaN since the last step: no training loss shows
    ],
)
def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    corpus, tmp_path, check_finite_every, poison_step, found_in
):
    run_dir = tmp_path / "run"
    check = f"module.check_finite_every={check_finite_every}"
    cfg = compose_run(tiny_overrides(corpus, run_dir, check), run_dir)
    with open_dict(cfg):
        cfg.callbacks.poison = {"_target_": f"{__name__}.PoisonAtStep", "step": poison_step}
    with pytest.raises(NonFiniteLossError, match=f"The {found_in} became NaN or inf") as raised:
        train(cfg)
    suggested = re.findall(r"(?:module|trainer)\.\w+", str(raised.value))
    assert len(suggested) == 3 and all(OmegaConf.select(cfg, key) for key in suggested)
    kept = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert kept["global_step"] == 3  # saved at the validation before the damage
    assert all(
        torch.isfinite(v).all()
        for v in final_weights(run_dir / "checkpoints" / "last.ckpt").values()
    )


@pytest.mark.slow
def test_a_validation_that_is_not_the_best_leaves_best_ckpt_alone(corpus, tmp_path):
    cfg = compose_run(tiny_overrides(corpus, tmp_path), tmp_path)
    with open_dict(cfg):  # the predictions turn uniform just before the second validation
        cfg.callbacks.spoil = {"_target_": f"{__name__}.PoisonAtStep", "step": 6, "value": 0.0}
    train(cfg)
    best, last = (tmp_path / "checkpoints" / name for name in ("best.ckpt", "last.ckpt"))
    assert torch.load(best, weights_only=True)["global_step"] == 3
    assert torch.load(last, weights_only=True)["global_step"] == 6
    assert not best.samefile(last)


@pytest.mark.slow
def test_a_stop_at_a_validation_writes_last_ckpt_once(corpus, tmp_path, saves):
    cfg = compose_run(tiny_overrides(corpus, tmp_path, "trainer.max_steps=9"), tmp_path)
    with open_dict(cfg):  # not a best at step 6, where the stop comes and a validation is due
        cfg.callbacks.spoil = {"_target_": f"{__name__}.PoisonAtStep", "step": 5, "value": 0.0}
        cfg.callbacks.signal = {"_target_": f"{__name__}.SignalAtStep", "step": 5}
    assert train(cfg).signal_name == "SIGINT"
    assert validated_steps(tmp_path) == [2, 5]
    assert saves == [("best.ckpt", 3), ("last.ckpt", 6)]  # last.ckpt at 3: a link to best.ckpt


@pytest.mark.slow
def test_without_hard_links_last_ckpt_is_saved_as_a_copy(corpus, tmp_path, monkeypatch, caplog):
    def no_links(source: object, destination: object) -> None:
        raise PermissionError(1, "Operation not permitted")  # as on a FAT or some network drives

    monkeypatch.setattr(os, "link", no_links)
    caplog.set_level(logging.INFO, logger="llm.callbacks")
    train_tiny(corpus, tmp_path)
    best, last = (tmp_path / "checkpoints" / name for name in ("best.ckpt", "last.ckpt"))
    assert not best.samefile(last)
    assert [torch.load(path, weights_only=True)["global_step"] for path in (best, last)] == [6, 6]
    assert caplog.text.count("last.ckpt is saved as a copy") == 1  # said once, at step 3
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.ckpt", "last.ckpt"]  # no .tmp


def test_a_resume_or_rerun_that_cannot_work_fails_clearly(corpus, tmp_path):
    run_dir = tmp_path / "run"
    train_tiny(corpus, run_dir)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"is at step 6, so trainer\.max_steps=6 leaves nothing"):
        train_tiny(corpus, tmp_path / "other", f"ckpt_path={checkpoint}")
    # A new run, or sweep, would overwrite the earlier one's checkpoints; a resume there may go
    # on. Hydra runs the check before it writes in the folder (see the script's test).
    resume = ("trainer.max_steps=8", f"ckpt_path={checkpoint}")
    for setting, folder, sweep in (("run", run_dir, False), ("sweep", tmp_path, True)):
        override = f"hydra.{setting}.dir={folder}"
        cfg = compose_run(tiny_overrides(corpus, run_dir, override), run_dir)
        with pytest.raises(ValueError, match=r"checkpoints \(.*best.ckpt, .*last.ckpt\), which"):
            check_no_earlier_run(cfg, sweep)
        check_no_earlier_run(
            compose_run(tiny_overrides(corpus, run_dir, override, *resume), run_dir), sweep
        )
    # Resuming another run's checkpoint here would overwrite this one's; with Lightning's SLURM
    # requeue checkpoint there, Lightning resumes this run itself.
    elsewhere = tmp_path / "elsewhere.ckpt"
    shutil.copy(checkpoint, elsewhere)
    foreign = (f"hydra.run.dir={run_dir}", "trainer.max_steps=8", f"ckpt_path={elsewhere}")
    with pytest.raises(ValueError, match=r"which this run would overwrite: set another hydra\.run"):
        check_no_earlier_run(compose_run(tiny_overrides(corpus, run_dir, *foreign), run_dir))
    (run_dir / "hpc_ckpt_1.ckpt").write_bytes(b"")
    requeued = compose_run(tiny_overrides(corpus, run_dir, f"hydra.run.dir={run_dir}"), run_dir)
    check_no_earlier_run(requeued)
    validate(compose_run(tiny_overrides(corpus, run_dir, *resume), run_dir))
    with pytest.raises(ValueError, match="n_layer: 2 in the checkpoint, 3 now"):
        train_tiny(corpus, tmp_path / "other", "model.n_layer=3", *resume)
    # Refused before the data is prepared again with the other tokenizer (over the old data).
    prepared = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*")}
    with pytest.raises(
        ValueError, match=r"'bytes', this run uses 'gpt2'; resume with tokenizer\.name=bytes$"
    ):
        train_tiny(corpus, tmp_path / "other", "tokenizer.name=gpt2", *resume)
    # The ranks file that came with the other name goes too.
    ranks_file = f"tokenizer.path={tmp_path / 'gpt2.tiktoken'}"
    with pytest.raises(
        ValueError, match=r"resume with tokenizer\.name=bytes tokenizer\.path=null$"
    ):
        train_tiny(corpus, tmp_path / "other", "tokenizer.name=gpt2", ranks_file, *resume)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*")} == prepared
    # Lightning would count validations and steps in the checkpoint's micro-batches.
    with pytest.raises(
        ValueError,
        match=r"took 6 micro-batches in 6 steps, this run would take 2 a step; resume "
        r"with trainer\.accumulate_grad_batches=1$",
    ):
        validate(
            compose_run(
                tiny_overrides(corpus, run_dir, *resume, "trainer.accumulate_grad_batches=2"),
                run_dir,
            )
        )
    # A checkpoint of the weights alone (ModelCheckpoint's save_weights_only).
    state = torch.load(checkpoint, weights_only=True)
    weights_only = tmp_path / "weights.ckpt"
    torch.save(
        {k: v for k, v in state.items() if k not in ("optimizer_states", "loops")}, weights_only
    )
    with pytest.raises(ValueError, match="holds the model's weights but not the optimizer's"):
        train_tiny(corpus, tmp_path / "other", "trainer.max_steps=8", f"ckpt_path={weights_only}")


@pytest.mark.slow
def test_a_resume_with_another_batch_size_goes_on_at_the_next_sample(corpus, tmp_path):
    train_tiny(corpus, tmp_path / "first")  # 6 steps of 8 samples
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["TokenDataModule"] == {"samples_used": 48}
    resume = ("trainer.max_steps=8", "data.batch_size=4", f"ckpt_path={checkpoint}")
    train_tiny(corpus, tmp_path / "resumed", *resume)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    # From sample 48, not from 6 steps of 4 samples (24, the same samples again).
    assert resumed["TokenDataModule"] == {"samples_used": 48 + 2 * 4}


def test_init_from_starts_training_from_the_weights_of_any_model_file(corpus, tmp_path):
    """Fine-tuning: a new run (fresh optimizer, schedule and step) from saved weights, with
    its own dropout and a shorter context, which keeps the first rows of the position table."""
    first = tmp_path / "first"
    train_tiny(corpus, first)  # 6 steps, context 32
    checkpoint = first / "checkpoints" / "last.ckpt"
    model, tokenizer = load_model(checkpoint)
    save_model(model, tmp_path / "model.safetensors", tokenizer)
    save_hf(model, tmp_path / "hf", eot_token=256, tokenizer=tokenizer)
    saved = model.state_dict()
    for source in (checkpoint, tmp_path / "model.safetensors", tmp_path / "hf"):
        shorter = ("model.context_length=16", "model.dropout=0.1")
        cfg = compose_run(
            tiny_overrides(corpus, tmp_path, f"init_from={source}", *shorter), tmp_path
        )
        _, module, _ = build(cfg)
        assert module.model.config.dropout == 0.1
        for name, weight in module.model.state_dict().items():
            expected = saved[name][:16] if name == "position_embedding.weight" else saved[name]
            if name in ("token_embedding.weight", "lm_head.weight"):  # GPT-2 folders: no padding
                weight, expected = weight[:257], expected[:257]
            assert torch.equal(weight, expected), (source, name)
    # Three steps on from the six-step model beat three steps from scratch.
    train_tiny(corpus, tmp_path / "tuned", f"init_from={checkpoint}", "trainer.max_steps=3")
    tuned = torch.load(tmp_path / "tuned" / "checkpoints" / "last.ckpt", weights_only=True)
    assert tuned["global_step"] == 3
    from_scratch = events_of(first).Scalars("val/loss")[0]  # at its step 3
    assert last_scalar(tmp_path / "tuned", "val/loss").value < from_scratch.value
    # A resume takes its weights from its checkpoint: init_from, which the resume command
    # repeats, is not read again (here it is gone).
    resume = ("init_from=gone.ckpt", "trainer.max_steps=8", f"ckpt_path={checkpoint}")
    build(compose_run(tiny_overrides(corpus, tmp_path / "resumed", *resume), tmp_path / "resumed"))


def test_init_from_weights_that_do_not_fit_the_run_fail_before_any_work(
    corpus, tmp_path, tiny_ranks_file, monkeypatch
):
    """Checked in validate, from the file's config alone (a sweep checks every job so), but
    for the vocabulary, which is the tokenizer's: checked when the run builds its model."""
    tiny = {"n_layer": 2, "n_head": 2, "n_embd": 32, "context_length": 32}
    bytes_spec = {"name": "bytes", "path": None}
    files = {
        "tiny": GPTConfig(**tiny, vocab_size=257),
        "nano": GPTConfig.from_preset("gpt-nano", vocab_size=257),
        "wide": GPTConfig(**tiny, vocab_size=300),  # a vocabulary the bytes tokenizer lacks
        "rope": GPTConfig(**tiny, vocab_size=257, pos_embedding="rope"),
        "windowed": GPTConfig(**tiny, vocab_size=257, sliding_window=[8, None]),
    }
    for name, config in files.items():
        save_model(GPT(config), tmp_path / f"{name}.safetensors", bytes_spec)
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "1e3").write_text("not a model either")
    monkeypatch.chdir(tmp_path)  # init_from names a file in the folder the run starts in

    def run_with(*overrides: str) -> DictConfig:
        return compose_run(tiny_overrides(corpus, tmp_path, *overrides), tmp_path)

    ranks = ("tokenizer.name=tiny", f"tokenizer.path={tiny_ranks_file}")
    for overrides, error, message in (
        (
            ("init_from=tiny.safetensors", "model.n_layer=3"),
            ValueError,
            r"holds another model \(n_layer: 2 in init_from's model, 3 now\); train it with "
            r"model\.n_layer=2$",
        ),
        (  # the preset this shape is, though this run names it already (and overrides it)
            ("init_from=nano.safetensors",),
            ValueError,
            r"n_layer: 3 in init_from's model, 2 now\); train it with model\.n_embd=48 "
            r"model\.n_head=3 model\.n_layer=3 \(the gpt-nano preset's shape\)$",
        ),
        (
            ("init_from=tiny.safetensors", "model.pos_embedding=rope"),
            ValueError,
            r"pos_embedding: 'learned' in init_from's model, 'rope' now\); train it with "
            r"model\.pos_embedding=learned$",
        ),
        (  # quoted for the shell, to which [8,null] is a glob pattern
            ("init_from=windowed.safetensors",),
            ValueError,
            r"train it with 'model\.sliding_window=\[8,null\]'$",
        ),
        (
            ("init_from=tiny.safetensors", "model.context_length=64"),
            ValueError,
            r"model.context_length=64 is longer than the 32 positions init_from=.* has learned: "
            r"give model.context_length=32 or less$",
        ),
        (
            ("init_from=tiny.safetensors", *ranks),
            ValueError,
            r"was trained with the tokenizer 'bytes', this run uses 'tiny'; train with "
            r"tokenizer\.name=bytes tokenizer\.path=null$",
        ),
        (("init_from=notes.txt",), ValueError, "is not a model file llm knows"),
        (("init_from=missing",), FileNotFoundError, r"^init_from=missing not found: give a "),
        (("init_from=1e3",), FileNotFoundError, r"init_from=1000.0 not found: .* put it in quotes"),
        (("init_from=''",), ValueError, r"^init_from is empty: give "),
    ):
        with pytest.raises(error, match=message):
            validate(run_with(*overrides))
    with pytest.raises(
        ValueError,
        match=r"the model has a vocabulary of 300 tokens, but the tokenizer 'bytes' has 257; "
        r"train with the tokenizer the model was trained with, tokenizer\.path=null$",
    ):
        build(run_with("init_from=wide.safetensors"))
    # RoPE learns no positions: any context goes.
    _, module, _ = build(
        run_with(
            "init_from=rope.safetensors", "model.pos_embedding=rope", "model.context_length=64"
        )
    )
    assert module.model.config.context_length == 64
    # Another spelling of the same model: n_kv_head as many as n_head, one window per layer.
    validate(run_with("init_from=tiny.safetensors", "model.n_kv_head=2"))
    validate(run_with("init_from=windowed.safetensors", "model.sliding_window=[8,null]"))


def test_two_spellings_of_one_model_are_the_same_model():
    """What a resume or init_from compares: the model each config builds, not its spelling."""
    base = GPTConfig(n_layer=2, n_head=4, n_embd=32).to_dict()
    windowed = {**base, "sliding_window": 8}
    rope = {**base, "pos_embedding": "rope"}
    for saved, current in (
        (base, {**base, "n_kv_head": 4}),  # None: as many key/value heads as query heads
        (base, {**base, "sliding_window": [None, None]}),
        (base, {**base, "rope_theta": 500.0}),  # no RoPE, so no RoPE frequencies
        (windowed, {**base, "sliding_window": [8, 8]}),
        (windowed, {**base, "sliding_window": (8, 8)}),
    ):
        assert config_differences(saved, current) == {}
    for saved, current, differences in (
        (base, {**base, "n_kv_head": 2}, {"n_kv_head": (None, 2)}),
        (windowed, {**base, "sliding_window": [8, None]}, {"sliding_window": (8, [8, None])}),
        (rope, {**rope, "rope_theta": 500.0}, {"rope_theta": (10000.0, 500.0)}),
        (base, {**base, "n_layer": 3}, {"n_layer": (2, 3)}),
        # Where the field a setting rests on differs too, the setting's own values are given:
        # taking every saved value back gives the saved model.
        (
            {**rope, "rope_theta": 500.0},
            base,
            {"pos_embedding": ("rope", "learned"), "rope_theta": (500.0, 10000.0)},
        ),
        (
            base,
            {**base, "n_head": 2, "n_kv_head": 2},
            {"n_head": (4, 2), "n_kv_head": (None, 2)},
        ),
        (
            windowed,
            {**base, "n_layer": 3, "sliding_window": [8, 8, 8]},
            {"n_layer": (2, 3), "sliding_window": (8, [8, 8, 8])},
        ),
        # and a setting with the same value on both sides is not named.
        ({**base, "n_kv_head": 4}, {**base, "n_head": 8, "n_kv_head": 4}, {"n_head": (4, 8)}),
    ):
        assert config_differences(saved, current) == differences


@pytest.mark.slow
def test_without_validation_last_ckpt_is_saved_where_validations_would_be(corpus, tmp_path, saves):
    train_tiny(corpus, tmp_path, "trainer.limit_val_batches=0", "trainer.max_steps=8")
    assert saves == [("last.ckpt", 3), ("last.ckpt", 6), ("last.ckpt", 8)]


def test_fast_dev_run_saves_no_checkpoint(corpus, tmp_path, saves):
    train_tiny(corpus, tmp_path, "+trainer.fast_dev_run=2")
    assert saves == []
    assert not (tmp_path / "checkpoints").exists()


def test_checkpoints_name_the_ranks_file_by_its_whole_path(
    corpus, tmp_path, tiny_ranks_file, monkeypatch
):
    monkeypatch.chdir(tiny_ranks_file.parent)  # generation may run from any other folder
    ranks = ("tokenizer.name=tiny", f"tokenizer.path={tiny_ranks_file.name}")
    _, module, _ = build(compose_run(tiny_overrides(corpus, tmp_path, *ranks), tmp_path))
    assert module.hparams["tokenizer"] == {"name": "tiny", "path": str(tiny_ranks_file.resolve())}


def test_a_callback_set_to_null_is_left_out(corpus, tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_run(tiny_overrides(corpus, run_dir, "callbacks.inspection=null"), run_dir)
    _, _, trainer = build(cfg)
    assert any(isinstance(c, GracefulStop) for c in trainer.callbacks)
    assert not any(c is None or isinstance(c, InspectionLogger) for c in trainer.callbacks)
    # The fix Hydra's refusal of callbacks=null suggests leaves them all out.
    overrides = [o for o in tiny_overrides(corpus, run_dir) if not o.startswith("callbacks.")]
    cfg = compose_run([*overrides, "~callbacks"], run_dir)
    _, _, trainer = build(cfg)
    assert not any(isinstance(c, (GracefulStop, InspectionLogger)) for c in trainer.callbacks)
    # Lightning adds no checkpoint callback of its own in place of llm's.
    assert trainer.checkpoint_callback is None


@pytest.mark.parametrize(
    ("override", "refused"),
    [
        ("seed=4294967295", None),
        ("seed=4294967296", "seed must be an integer in [0, 2**32)"),
        ("trainer.limit_val_batches=0", None),
        ("trainer.limit_val_batches=1.0", None),
        ("trainer.gradient_clip_val=0", None),
        ("trainer.deterministic=null", None),  # Lightning's default
        ("data.val_fraction=0", "data.val_fraction must be a number between 0 and 1"),
        ("module.min_lr=0", None),
        ("module.betas=[0.9,1.0]", "module.betas must be two numbers in [0, 1)"),
        ("module.min_lr=1e-2", "module.min_lr must not exceed module.learning_rate"),
        ("trainer.devices=2", None),  # processes on the CPU
        ("trainer.devices='2'", None),
        ("trainer.devices=auto", None),
        *(
            pytest.param(
                f"trainer.devices={devices}",
                f"trainer.devices={shown} is for GPUs, but this run is on the CPU",
                marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there"),
            )
            for devices, shown in (("-1", "-1"), ("[0,1]", "[0, 1]"))
        ),
        ("trainer.precision=bf16-mixed", None),
        ("trainer.precision=32", None),
        ("callbacks.progress_bar=null", None),  # nothing to check
        ("data.data_dir=2024", None),  # a folder named like a number
        ("+logger.flush_secs=5", None),  # TensorBoard's SummaryWriter takes it
    ],
)
def test_the_edges_of_what_the_config_allows(corpus, tmp_path, override, refused):
    run_dir = tmp_path / "run"
    cfg = compose_run(tiny_overrides(corpus, run_dir, override), run_dir)
    if refused is None:
        validate(cfg)
    else:
        with pytest.raises(ValueError, match=re.escape(refused)):
            validate(cfg)


@pytest.mark.parametrize("sweep", [False, True])
def test_a_rerun_is_told_to_resume_from_the_last_checkpoint(corpus, tmp_path, sweep):
    folder = tmp_path / "earlier"
    run = folder / "3" if sweep else folder  # a sweep's job 3
    for name in ("a.ckpt", "b.ckpt", "best.ckpt", "c.ckpt", "last.ckpt"):  # sorted: last is last
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run / "checkpoints" / name).write_bytes(b"")
    setting = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    cfg = compose_run(tiny_overrides(corpus, folder, f"{setting}={folder}"), folder)
    with pytest.raises(ValueError) as refused:
        check_no_earlier_run(cfg, sweep)
    message, last = str(refused.value), run / "checkpoints" / "last.ckpt"
    assert "c.ckpt, ...)" in message and message.endswith(f"ckpt_path={last}")
    assert (f"hydra.run.dir={run} ckpt_path" in message) == sweep


def test_a_value_hydra_would_split_is_quoted():
    assert hydra_value("runs/a_b-1.ckpt") == "runs/a_b-1.ckpt"
    assert hydra_value("a,b") == "'a,b'"  # unquoted, a comma makes a sweep
    assert hydra_value("it's here") == "'it\\'s here'"


def test_dated_folders_are_removed_only_above_a_single_run(corpus, tmp_path):
    run_dir = tmp_path / "outputs" / "day" / "time"
    compose_run(tiny_overrides(corpus, run_dir), run_dir)
    hydra_config = HydraConfig.get()
    with read_write(hydra_config):
        hydra_config.mode = RunMode.RUN
        assert dated_folders_above(run_dir, hydra_config) == [run_dir.parent]
        hydra_config.mode = RunMode.MULTIRUN  # a sweep's folder holds its multirun.yaml
        assert dated_folders_above(run_dir, hydra_config) == []


def test_gradient_clipping_turns_off_with_null_as_in_lightning(corpus, tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_run(tiny_overrides(corpus, run_dir, "trainer.gradient_clip_val=null"), run_dir)
    assert build(cfg)[2].gradient_clip_val is None
    cfg = compose_run(tiny_overrides(corpus, run_dir, "trainer.gradient_clip_val=-1"), run_dir)
    with pytest.raises(ValueError, match=r"trainer\.gradient_clip_val must be null or 0"):
        build(cfg)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_model_summary_follows_the_trainer_setting(corpus, tmp_path, enabled):
    run_dir = tmp_path / "run"
    setting = f"trainer.enable_model_summary={enabled}"
    _, _, trainer = build(compose_run(tiny_overrides(corpus, run_dir, setting), run_dir))
    summaries = [type(c) for c in trainer.callbacks if isinstance(c, ModelSummary)]
    assert summaries == ([GPTSummary] if enabled else [])  # never Lightning's table


@pytest.mark.slow
def test_a_sample_prompt_longer_than_the_context_fails_before_training(corpus, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="sample_prompt: The prompt of 40 tokens is longer"):
        train_tiny(corpus, run_dir, f"callbacks.inspection.sample_prompt={'x' * 40}")
    assert not (run_dir / "checkpoints").exists()


def fsdp_rank(rank: int, store: str, strategy_kwargs: dict, results: str) -> None:
    """One of two CPU ranks: shard a tiny module as ``trainer=fsdp`` does, make its optimizer
    groups, and draw its attention maps on rank 0."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2
    )
    try:
        torch.manual_seed(0)
        module = GPTLightningModule(
            model={"vocab_size": 257, "context_length": 8, "n_layer": 2, "n_head": 2, "n_embd": 8},
            tokenizer={"name": "bytes", "path": None},
        )
        wrapped = FullyShardedDataParallel(module, device_id=torch.device("cpu"), **strategy_kwargs)
        decayed, others = module.parameter_groups()
        whole = whole_model_on_rank_zero(wrapped, module.model)
        torch.distributed.barrier()  # rank 1 went on at once; rank 0 runs the model alone:
        if rank == 0:
            tokenizer = load_tokenizer("bytes")
            result = {
                "shards": [tuple(p.shape) for p in module.model.parameters()],
                "decayed": len(decayed["params"]),
                "others": len(others["params"]),
                "figures": len(model_attention_figures(whole, tokenizer, "Hi!", 8)),
                "sample": generate_text(whole, tokenizer, "Hi", max_new_tokens=16, top_k=1),
                "whole": {name: p.shape for name, p in whole.named_parameters()},
                "whole_is_training": whole.training,
            }
            torch.save(result, results)
        else:
            assert whole is None
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_fsdp_shards_keep_weight_decay_and_inspection(corpus, tmp_path):
    # Lightning's FSDP runs only on GPUs; torch's FSDP, which it wraps, runs here on gloo.
    cfg = compose_run([*TINY, f"data.source={corpus}", "trainer=fsdp"], tmp_path)
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    kwargs = {**strategy.kwargs, "sharding_strategy": strategy.sharding_strategy}
    results = tmp_path / "results.pt"
    torch.multiprocessing.spawn(
        fsdp_rank, args=(str(tmp_path / "store"), kwargs, str(results)), nprocs=2
    )
    result = torch.load(results)
    assert all(len(shape) == 1 for shape in result["shards"])  # every weight is a flat shard
    # Decayed: the two embeddings, and per block attn.qkv, attn.out_proj, mlp.fc and mlp.proj.
    # Not: per block two norms' gains and biases and those four layers' biases; the final norm.
    assert (result["decayed"], result["others"]) == (2 + 2 * 4, 2 * 8 + 2)
    assert result["figures"] == 2
    assert len(result["sample"]) > 0  # 16 forward passes of the copy, none of them collective
    assert result["whole"]["blocks.0.attn.qkv.weight"] == (24, 8)
    assert result["whole_is_training"] is False  # no dropout in the maps and samples


def run_ddp_on_cpu(*overrides: str, sweep: bool = False) -> subprocess.CompletedProcess:
    """``scripts/train.py`` with DDP over two CPU processes (gloo), each saving its first batch
    and learning rate (``RecordFirstBatch``, imported from tests/ by every rank). A sweep's
    ``-m`` comes last, where argparse once refused what Lightning adds after it."""
    return run_script(
        "+callbacks.record._target_=test_train.RecordFirstBatch",  # before any the caller adds
        *overrides,
        "trainer=ddp",  # after the tiny run's trainer=cpu
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        *(["-m"] if sweep else []),
        # Prepended: where llm is not installed, the caller's PYTHONPATH finds it.
        env={
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])
            )
        },
    )


@pytest.mark.slow
def test_ddp_on_cpu_ranks_see_different_batches_and_dropout(corpus, tmp_path):
    run_dir = tmp_path / "run"
    result = run_ddp_on_cpu(
        *tiny_overrides(corpus, run_dir), "trainer.max_steps=3", f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(run_dir / f"rank{r}.pt") for r in (0, 1))
    assert rank0["batch"].shape == rank1["batch"].shape
    assert not torch.equal(rank0["batch"], rank1["batch"])
    assert not torch.equal(rank0["draw"], rank1["draw"])  # and draw their own dropout masks
    # Each rank keeps its own count of non-finite losses: DDP does not copy rank 0's over it.
    assert [torch.load(run_dir / f"rank{r}_nan.pt").item() for r in (0, 1)] == [0, 1]
    val0, val1 = (torch.load(run_dir / f"rank{r}_val.pt") for r in (0, 1))
    assert val0.shape == val1.shape and not torch.equal(val0, val1)  # each validates its share
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


@pytest.mark.slow
def test_ddp_sweep_starts_each_jobs_own_ranks_and_stops_at_an_error(corpus, tmp_path):
    # Lightning starts rank 1 from the command line: each job's own, not the whole sweep's. An
    # error must end the sweep: the next job would wait for the failed job's ranks.
    sweep_dir = tmp_path / "sweep"
    result = run_ddp_on_cpu(
        *tiny_overrides(corpus, sweep_dir),
        "trainer.max_steps=2",
        "module.learning_rate=0.001,0.002,0.003",
        "+callbacks.fail._target_=test_train.FailOnRankZero",
        "+callbacks.fail.learning_rate=0.002",
        f"hydra.sweep.dir={sweep_dir}",
        sweep=True,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "the sweep stops here" in result.stdout and "RuntimeError: a bug" in result.stdout
    for job_dir, learning_rate in ((sweep_dir / "0", 0.001), (sweep_dir / "1", 0.002)):
        assert (job_dir / "train_ddp_process_1.log").is_file()  # rank 1 ran in the job's folder
        rank0, rank1 = (torch.load(job_dir / f"rank{r}.pt") for r in (0, 1))
        assert rank0["learning_rate"] == rank1["learning_rate"] == learning_rate
        assert not torch.equal(rank0["batch"], rank1["batch"])
    assert (sweep_dir / "0" / "checkpoints" / "last.ckpt").is_file()
    assert not (sweep_dir / "2").exists()


def test_lightnings_advice_to_add_loader_workers_is_not_printed(monkeypatch):
    # Lightning gives it on machines with more than two cores; this one may have two.
    monkeypatch.setattr(data_connector, "suggested_max_num_workers", lambda num_devices: 15)
    trainer, loader = SimpleNamespace(num_devices=1), torch.utils.data.DataLoader([])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data_connector._worker_check(trainer, loader, "train_dataloader")
        assert "does not have many workers" in str(caught[-1].message)  # the advice, unfiltered
        caught.clear()
        quiet_lightning()
        data_connector._worker_check(trainer, loader, "train_dataloader")
    assert caught == []


# --- configs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "experiment", sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
)
def test_every_experiment_builds(corpus, tmp_path, experiment):
    # Built, not only composed: a mistyped key in an experiment file merges silently and fails
    # only when the class it reaches refuses it. The model is shrunk and the GPU recipe moved
    # to the CPU; everything else is the experiment's own.
    shrink = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "trainer.accelerator=cpu"]
    data = ["tokenizer.name=bytes", "data=text", f"data.source={corpus}"]
    cfg = compose_run([f"experiment={experiment}", *shrink, *data], tmp_path)
    _, module, trainer = build(cfg)
    assert trainer.max_steps == cfg.trainer.max_steps > 0
    assert module.learning_rate == cfg.module.learning_rate


def test_a_source_folder_named_by_a_number(corpus, tmp_path, monkeypatch):
    (tmp_path / "2024").mkdir()
    corpus.rename(tmp_path / "2024" / corpus.name)
    monkeypatch.chdir(tmp_path)
    cfg = compose_run([*TINY, "data.source=2024", f"data.data_dir={tmp_path / 'data'}"], tmp_path)
    assert cfg.data.source == 2024  # Hydra reads the override as a number
    validate(cfg)
    assert hydra.utils.instantiate(cfg.data).dataset_dir == tmp_path / "data" / "2024"


def test_the_settings_a_run_reads_at_the_top_are_train_yamls():
    train_yaml = OmegaConf.load(CONFIGS / "train.yaml")
    # Each experiment's settings land in the groups' (@package _global_), not under its name.
    groups = {name for entry in train_yaml.defaults if entry != "_self_" for name in entry}
    expected = set(train_yaml) - {"defaults", "hydra"} | groups - {"experiment"}
    assert set(RUN_SETTINGS) == expected


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "+model.n_layers=8",
            "model.n_layers is not a setting, and nothing would read it: "
            "did you mean model.n_layer?",
        ),
        ("+tokenizer.nmae=x", "did you mean tokenizer.name?"),
        (
            "model.vocab_size=100",
            "model.vocab_size=100 cannot be set: the vocabulary is the tokenizer's",
        ),
        (
            "model.n_head=5",
            "model.n_embd (32) must be divisible by n_head (5); try model.n_embd=30.",
        ),
        ("model.dropout=1.5", "model.dropout must be in [0, 1), got 1.5."),
        ("data.seed=-1", "data.seed must be an integer in [0, 2**32), got -1"),
        ("module.seed=2**32", "module.seed must be an integer in [0, 2**32), got '2**32'"),
        ("trainer.limit_val_batches=-1", "trainer.limit_val_batches must be null (every batch)"),
        ("trainer.limit_val_batches=1.5", "a number of batches, or a fraction in [0, 1], got 1.5"),
        ("module.learning_rate=fast", "module.learning_rate must be a positive finite number"),
        ("module.learning_rate=inf", "module.learning_rate must be a positive finite number"),
        ("module.weight_decay=inf", "module.weight_decay must be a non-negative finite number"),
        ("trainer.precision=16-true", "trainer.precision=16-true keeps the weights and AdamW's"),
        ("module.compile_mode=fast", "module.compile_mode must be one of default, reduce-overhead"),
        ("module.betas=[0.9]", "module.betas must be two numbers in [0, 1)"),
        ("data.source=null", "data.source is not set: give a text file, a folder or a glob"),
        ("data.source=missing.txt", "'missing.txt' not found: give a text file"),
        ("ckpt_path=missing.ckpt", "ckpt_path=missing.ckpt does not exist or is a folder"),
        pytest.param(
            "trainer=gpu",
            "trainer.accelerator=gpu but torch sees no CUDA GPU here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there"),
        ),
        ("module.compile_model=no", "module.compile_model must be true or false, got 'no'"),
        ("trainer.deterministic=maybe", "trainer.deterministic must be true, false, warn or"),
        ("trainer.devices=abc", "trainer.devices must be a number of devices, -1 (all), auto,"),
        ("trainer.devices=1.5", "trainer.devices must be a number of devices"),
        ("trainer.precision=16-bogus", "trainer.precision must be auto, bf16-mixed, 16-mixed,"),
        ("callbacks.progress_bar.refresh_rate=abc", "refresh_rate must be a positive integer"),
        (
            "callbacks.checkpoint.monitor=val/los",
            "callbacks.checkpoint.monitor=val/los is no metric the run logs: use one of val/loss",
        ),
        (
            "+data.context_length=64",
            "data.context_length cannot be set: it is model.context_length's",
        ),
        # Added at the top with +, where nothing reads them.
        (
            "+max_steps=5",
            "max_steps is not a setting, and nothing would read it: did you mean "
            "trainer.max_steps?",
        ),
        ("+foo=1", "foo is not a setting, and nothing would read it: the settings are callbacks"),
        ("tokenizer=bytes", "tokenizer holds settings (tokenizer.name, tokenizer.path), not one"),
        # TensorBoard's logger hands keys it does not know (flush_secs is one it does) to its
        # SummaryWriter, which would refuse a misspelt one only when the run first logs.
        (
            "+logger.flush_sec=5",
            "logger.flush_sec is not a setting, and nothing would read it: did you mean "
            "logger.flush_secs?",
        ),
        ("tokenizer=null", "tokenizer holds settings (tokenizer.name, tokenizer.path), not one"),
        ("trainer.num_nodes=abc", "trainer.num_nodes must be a positive integer, got 'abc'"),
        (  # validation would never come due in the run's one endless epoch
            "trainer.check_val_every_n_epoch=2",
            "trainer.check_val_every_n_epoch must be null (the run is one endless epoch",
        ),
        ("data.data_dir=null", "data.data_dir must be a folder for the prepared tokens, got None"),
        ("data.data_dir=''", "data.data_dir must be a folder for the prepared tokens, got ''"),
        (  # Hydra reads it as a number, 1000.0
            "ckpt_path=1e3",
            "ckpt_path=1000.0 does not exist or is a folder; give a .ckpt file; for a name like a "
            """number or true, put it in quotes, inside the shell's: 'ckpt_path="..."'""",
        ),
    ],
)
def test_settings_nothing_reads_and_bad_model_values_are_refused(
    corpus, tmp_path, override, message
):
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        validate(compose_run(tiny_overrides(corpus, tmp_path, override), tmp_path))


def test_files_in_the_way_are_refused_before_any_work(corpus, tmp_path):
    not_a_checkpoint = tmp_path / "garbage.ckpt"
    not_a_checkpoint.write_bytes(b"PK\x03\x04 cut short")
    a_file = tmp_path / "a-file"  # in the way of a folder
    a_file.write_text("")
    for override, message in (
        (f"ckpt_path={not_a_checkpoint}", "could not be read as a training checkpoint"),
        (f"data.data_dir={a_file / 'data'}", f"({a_file} is not a folder): set data.data_dir"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            validate(compose_run(tiny_overrides(corpus, tmp_path, override), tmp_path))
    # Checked as the run is built: the folder may name the run's own (${hydra:runtime...}).
    cfg = compose_run(tiny_overrides(corpus, tmp_path, "logger.save_dir=null"), tmp_path)
    with pytest.raises(
        ValueError, match=r"logger\.save_dir must be a folder for the logs, as text"
    ):
        build(cfg)


def test_several_nodes_are_refused_unless_something_starts_every_node(
    corpus, tmp_path, monkeypatch
):
    for launcher_variable in ("NODE_RANK", "RANK", "SLURM_NTASKS", "LSB_JOBID"):
        monkeypatch.delenv(launcher_variable, raising=False)
    cfg = compose_run(tiny_overrides(corpus, tmp_path, "trainer.num_nodes=2"), tmp_path)
    with pytest.raises(ValueError, match="nothing starts the run on the other nodes"):
        validate(cfg)  # Lightning would wait for the other node forever
    monkeypatch.setenv("NODE_RANK", "1")  # started by hand on each node
    validate(cfg)


def test_a_warmup_longer_than_the_run_is_warned_of(corpus, tmp_path, caplog):
    validate(compose_run(tiny_overrides(corpus, tmp_path, "module.warmup_steps=6"), tmp_path))
    assert caplog.messages == []  # the last step reaches the peak learning rate
    validate(compose_run(tiny_overrides(corpus, tmp_path, "module.warmup_steps=7"), tmp_path))
    assert caplog.messages == [
        "module.warmup_steps=7 is more than trainer.max_steps=6: the learning rate never reaches "
        "module.learning_rate"
    ]


@pytest.mark.parametrize(
    ("group", "options"),
    [
        (group.name, sorted(p.stem for p in group.glob("*.yaml")))
        for group in sorted(CONFIGS.iterdir())
        if group.is_dir() and group.name != "experiment"
    ]
    + [
        (
            "model",
            [
                "gpt2",
                "gpt2-medium",
                "gpt2-large",
                "gpt2-xl",
                "gpt-mini",
                "gpt-micro",
                "gpt-nano",
                "gpt-micro-modern",
                "gpt2-modern",
            ],
        )
    ],
)
def test_every_group_option_composes(corpus, tmp_path, group, options):
    for option in options:
        cfg = compose_run([*TINY, f"data.source={corpus}", f"{group}={option}"], tmp_path)
        assert cfg.hydra.runtime.choices[group] == option


# --- the Lightning module on its own, with a tiny model and random tokens -------------------

TINY_CONTEXT = 8


def tiny_module(**options: object) -> GPTLightningModule:
    return GPTLightningModule(
        model={
            "vocab_size": 50,
            "context_length": TINY_CONTEXT,
            "n_layer": 1,
            "n_head": 2,
            "n_embd": 8,
        },
        tokenizer={"name": "bytes", "path": None},
        **options,
    )


def test_a_nonfinite_loss_on_another_rank_stops_this_one_too():
    module = tiny_module()
    reductions = []

    def reduce(count: torch.Tensor, reduce_op: str) -> torch.Tensor:
        reductions.append(reduce_op)
        count += 1  # in place, as DDP's all-reduce is; another rank saw one NaN loss
        return count

    module._trainer = SimpleNamespace(
        world_size=2, strategy=SimpleNamespace(reduce=reduce), global_step=7
    )
    with pytest.raises(NonFiniteLossError, match="by step 7"):
        module.check_finite()
    assert reductions == ["sum"]
    assert module.nonfinite_losses.item() == 0  # this rank's own count is left as it was


@pytest.mark.skipif(torch.cuda.is_available(), reason="for machines without a CUDA GPU")
def test_a_gpu_that_is_not_there_is_refused_by_name():
    with pytest.raises(ValueError, match="'cuda:1', but torch sees no CUDA GPU here"):
        device_from_name("cuda:1")
    assert device_from_name("auto") == torch.device("cpu")


def test_compile_mode_reaches_torch_compile_of_the_loss_alone(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda function, mode: compiled.append((function, mode)))
    module = tiny_module(compile_model=True, compile_mode="max-autotune-no-cudagraphs")
    module.configure_model()
    # GPT.loss, not forward: compiled, returned logits would take a gradient (see GPT.loss).
    assert compiled == [(module.model.loss, "max-autotune-no-cudagraphs")]


def test_a_resume_takes_the_configs_learning_rate_betas_and_weight_decay(tmp_path):
    # The checkpoint brings the optimizer's state and the step; the config, its settings.
    B, checkpoint = 4, tmp_path / "last.ckpt"
    first = cpu_trainer(max_steps=2, logger=False)
    first.fit(tiny_module(), train_dataloaders=token_batches(2, B))
    first.save_checkpoint(checkpoint)
    options = {"learning_rate": 2e-3, "min_lr": 1e-4, "betas": (0.8, 0.9), "weight_decay": 0.2}
    module, logger = tiny_module(warmup_steps=3, **options), RecordMetrics()
    resumed = cpu_trainer(max_steps=6, log_every_n_steps=1, logger=logger)
    resumed.fit(module, train_dataloaders=token_batches(6, B), ckpt_path=checkpoint)
    lr_at = {step: m["train/lr"] for step, m in logger.logged.items() if "train/lr" in m}
    assert sorted(lr_at) == [2, 3, 4, 5]  # the steps after the checkpoint's
    for step, lr in lr_at.items():  # warmup, then cosine decay towards min_lr
        assert lr == pytest.approx(2e-3 * warmup_cosine(step, 3, 6, 1e-4 / 2e-3), rel=1e-6)
    assert lr_at[5] == pytest.approx(1e-4 + (2e-3 - 1e-4) * 0.25, rel=1e-6)  # 2/3 of the decay
    decayed, others = resumed.optimizers[0].param_groups
    assert decayed["betas"] == others["betas"] == (0.8, 0.9)
    assert (decayed["weight_decay"], others["weight_decay"]) == (0.2, 0.0)
    assert resumed.optimizers[0].state  # Adam's moments came from the checkpoint


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_the_validation_loss_is_the_mean_over_every_token(precision):
    # Under bf16-true Lightning casts the whole module; summed in bf16, 64 batches' losses
    # (weighted by their 1,024 tokens) would round to the nearest 1,024 and more.
    batches, B = 64, 1024 // TINY_CONTEXT
    torch.manual_seed(0)
    module, loader = tiny_module(), token_batches(batches, B)
    trainer = cpu_trainer(precision=precision, logger=False)
    (logged,) = trainer.validate(module, loader, verbose=False)
    with torch.no_grad():
        losses = [module.model.loss(x, y).double() for x, y in loader]
    assert logged["val/loss"] == pytest.approx(float(sum(losses) / batches), rel=1e-5)


class RecordInspection:
    """Stands in for a TensorBoardLogger: what ``InspectionLogger`` gives its writer."""

    def __init__(self) -> None:
        self.figures: list[tuple[str, int]] = []
        self.texts: list[str] = []
        self.experiment = self

    def add_figure(self, tag: str, figure: object, step: int, close: bool) -> None:
        self.figures.append((tag, step))

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.texts.append(text)


def test_inspection_probes_within_the_context_and_samples_anew_at_each_step():
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=257, context_length=TINY_CONTEXT, n_layer=1, n_head=2, n_embd=8)
    )
    tokenizer = load_tokenizer("bytes")
    inspection = InspectionLogger(probe_text="x" * 50, max_probe_tokens=24, sample_tokens=16)
    record = RecordInspection()
    for step in (3, 6, 3):  # a probe longer than the context of 8 is cut to it
        inspection.log_inspection(record, model, tokenizer, step)
    assert record.figures == [("attention/layer_0", step) for step in (3, 6, 3)]
    first, other, again = record.texts
    assert first == again and first != other  # the sampler is seeded by the step
    with pytest.raises(ValueError, match="max_probe_tokens must be a whole number >= 1, got 0"):
        InspectionLogger(max_probe_tokens=0)


# As configs/callbacks/default.yaml makes the checkpoint callback: one name per kind of file.
KEPT_AS_CONFIGURED = {"monitor": "val/loss", "enable_version_counter": False}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: InspectionLogger(probe_text=123), "probe_text must be some text, got 123"),
        (lambda: InspectionLogger(sample_prompt=""), "sample_prompt must be some text, got ''"),
        (lambda: InspectionLogger(sample_tokens=2.5), "sample_tokens must be a whole number >= 0"),
        (lambda: TokenThroughputMonitor(2.5), "window_size must be a whole number >= 2"),
        (lambda: GracefulStop(0), "distributed_check_every must be a positive whole number"),
        (
            lambda: BestAndLastCheckpoint(**KEPT_AS_CONFIGURED, filename="best", save_top_k=3),
            "save_top_k=3 keeps several checkpoints, but the filename 'best' names one",
        ),
    ],
)
def test_callback_settings_of_the_wrong_kind_are_refused_when_built(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_several_best_checkpoints_are_kept_under_names_that_differ():
    several = BestAndLastCheckpoint(**KEPT_AS_CONFIGURED, filename="best-{step}", save_top_k=3)
    assert several.save_top_k == 3
    one = BestAndLastCheckpoint(**KEPT_AS_CONFIGURED, filename="best", save_top_k=1)
    assert one.save_top_k == 1


def test_a_diverged_model_is_never_saved():
    module = tiny_module()
    module.trainer = SimpleNamespace(world_size=1, global_step=5)
    module.nonfinite_losses += 1
    with pytest.raises(NonFiniteLossError, match="by step 5"):
        module.on_save_checkpoint({})


class NaNLossAtStep(L.Callback):
    """Makes the loss of one step NaN, leaving the weights alone (the NaN has no gradient)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        loss = pl_module.model.loss
        nan = torch.tensor(float("nan"))
        if trainer.global_step == self.step:
            pl_module.model_loss = lambda x, y: torch.where(nan.isnan(), nan, loss(x, y))
        else:
            pl_module.model_loss = loss


def test_a_nan_loss_of_one_step_is_caught_by_a_later_check():
    module = tiny_module(check_finite_every=4)
    trainer = cpu_trainer(max_steps=8, logger=False, callbacks=[NaNLossAtStep(1)])
    with pytest.raises(NonFiniteLossError, match="by step 4"):
        trainer.fit(module, train_dataloaders=token_batches(8, 4))
    assert all(torch.isfinite(p).all() for p in module.parameters())  # only the loss was NaN


def test_a_schedule_without_max_steps_is_refused():
    trainer = cpu_trainer(max_steps=-1, max_epochs=1, logger=False)
    with pytest.raises(ValueError, match=r"Set trainer\.max_steps > 0"):
        trainer.fit(tiny_module(), train_dataloaders=token_batches(2, 4))


def test_dropout_masks_differ_by_rank_and_step_and_repeat_on_resume():
    # Ranks share the seed and the weights, not the data: each draws its own masks. A step's
    # masks are the same whenever it runs, which makes a resumed run repeat the uninterrupted one.
    def mask(
        rank: int, step: int, batch_idx: int, accumulate: int = 1, seed: int = 7
    ) -> torch.Tensor:
        module = tiny_module(seed=seed)
        loops = SimpleNamespace(epoch_loop=SimpleNamespace())
        module.trainer = SimpleNamespace(
            global_rank=rank, global_step=step, accumulate_grad_batches=accumulate, fit_loop=loops
        )
        module.on_train_batch_start(None, batch_idx)
        return torch.nn.functional.dropout(torch.ones(256), 0.5)

    first = mask(rank=0, step=3, batch_idx=3)
    torch.rand(100)  # whatever drew from the generator in between
    assert torch.equal(mask(rank=0, step=3, batch_idx=3), first)
    others = [
        mask(rank=1, step=3, batch_idx=3),
        mask(rank=0, step=4, batch_idx=4),
        mask(rank=0, step=3, batch_idx=3, seed=8),
        mask(rank=0, step=3, batch_idx=7, accumulate=2),  # the second of the step's two batches
    ]
    assert all(not torch.equal(other, first) for other in others)
    assert torch.equal(mask(rank=0, step=3, batch_idx=6, accumulate=2), first)


def token_batches(steps: int, batch_size: int) -> torch.utils.data.DataLoader:
    """``steps`` batches of random (inputs, targets) windows for ``tiny_module``."""
    tokens = torch.randint(0, 50, (steps * batch_size, TINY_CONTEXT + 1))
    dataset = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size)


def cpu_trainer(**options: Any) -> L.Trainer:
    """A CPU Trainer for ``tiny_module`` runs: no checkpoints, progress bar or model summary
    unless ``options`` say otherwise."""
    quiet = dict(enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(accelerator="cpu", **{**quiet, **options})


@pytest.fixture
def fused_adamw(monkeypatch: pytest.MonkeyPatch) -> None:
    """AdamW fused on the CPU too, as the module makes it on CUDA."""
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **kw: adamw(*a, **{**kw, "fused": True}))


def test_precision_auto_resolves_to_bf16_only_where_fast(monkeypatch):
    monkeypatch.setattr("llm.hardware.cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr("llm.hardware.cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("16-mixed", "cpu") == "16-mixed"


def test_warmup_then_cosine_to_min_lr():
    factors = [
        warmup_cosine(step, warmup_steps=10, max_steps=110, min_lr_ratio=0.1) for step in range(121)
    ]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert max(factors) == pytest.approx(1.0) and factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in pairwise(factors[10:]))  # never rises
    assert factors[60] == pytest.approx(0.55) and factors[110] == pytest.approx(0.1)
    assert factors[120] == pytest.approx(0.1)


def test_weight_decay_only_on_weight_matrices():
    module = tiny_module()
    module.trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False)
    optimizer = module.configure_optimizers()["optimizer"]
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"])
    assert all(p.dim() == 1 for p in plain["params"])
    named = dict(module.model.named_parameters())
    assert any(p is named["blocks.0.norm1.weight"] for p in plain["params"])
    assert any(p is named["blocks.0.attn.qkv.bias"] for p in plain["params"])


class RecordMetrics(Logger):
    """A logger that keeps every metrics dict it is given, by step."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: dict[int, dict[str, float]] = {}

    name, version = "record", 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.setdefault(step, {}).update(metrics)

    def log_hyperparams(self, *args: object, **kwargs: object) -> None:
        pass


class SlowValidationEnd(L.Callback):
    SECONDS = 2.0

    def on_validation_end(self, *args: object) -> None:
        time.sleep(self.SECONDS)


def test_throughput_monitor_reads_the_clock_only_on_logging_steps():
    B, T, steps = 4, TINY_CONTEXT, 8
    module = tiny_module()
    loader = token_batches(steps, B)
    logger = RecordMetrics()
    trainer = cpu_trainer(
        max_steps=steps,
        log_every_n_steps=3,
        val_check_interval=4,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=[TokenThroughputMonitor(window_size=2), SlowValidationEnd()],
    )
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    readings = {step: m for step, m in logger.logged.items() if "train/lengths" in m}
    assert sorted(readings) == [3, 6]
    assert readings[6]["train/lengths"] == 6 * B * T and readings[6]["train/samples"] == 6 * B
    assert "train/device/items_per_sec" not in readings[3]  # a window of 2 needs 2 readings
    seconds = readings[6]["train/time"] - readings[3]["train/time"]
    assert readings[6]["train/device/items_per_sec"] == pytest.approx(3 * B * T / seconds)
    flops = 3 * module.flops_per_batch
    assert readings[6]["train/device/flops_per_sec"] == pytest.approx(flops / seconds)
    assert "train/device/mfu" not in readings[6]  # no known peak for a CPU
    # The validation at step 4, and the sleep after it, are left out: 3 steps of a tiny model.
    assert seconds < SlowValidationEnd.SECONDS


@pytest.mark.parametrize(
    ("name", "bf16", "tf32"),
    [
        ("NVIDIA H200", 989.4e12, 494.7e12),
        ("NVIDIA H100 80GB HBM3", 989.4e12, 494.7e12),  # from Lightning's table
        ("NVIDIA H100 NVL", 835.5e12, 417.5e12),
        ("NVIDIA H200 NVL", 835.5e12, 417.5e12),
    ],
)
def test_peak_flops_are_dense_and_known_for_the_h100_and_h200(monkeypatch, name, bf16, tf32):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr("lightning.fabric.accelerators.cuda._is_ampere_or_later", lambda: True)
    assert peak_flops(cuda, torch.bfloat16) == pytest.approx(bf16)
    # fp32 matmuls on the tensor cores, as training sets them up.
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert peak_flops(cuda, torch.float32) == pytest.approx(tf32)


def test_peak_flops_are_unknown_for_cpus():
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None
    assert precision_dtype("bf16-mixed") is torch.bfloat16
    assert precision_dtype("32-true") is torch.float32
    assert precision_dtype("16-mixed") is torch.float16


def test_fused_optimizer_with_bf16_clips_gradients(fused_adamw):
    # Lightning's bf16-mixed plugin refuses to clip for a fused optimizer: the module clips.
    B = 4
    module = tiny_module()
    loader = token_batches(2, B)
    trainer = cpu_trainer(precision="bf16-mixed", max_steps=2, gradient_clip_val=1e-6, logger=False)
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 2
    assert trainer.optimizers[0].defaults["fused"]
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and torch.nn.utils.get_total_norm(grads) <= 1e-6 * 1.01


class CountHostReads(L.Callback):
    """Counts reads of tensor values on the host (``item``, ``bool``, ``float``, ``int``,
    ``tolist``: each one waits for the GPU there) from the start of training to its end,
    validation included. The model's check of CPU token ids and targets
    (``GPT._check_in_vocabulary``, skipped on accelerators) is not counted."""

    READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist")

    def __init__(self) -> None:
        self.reads, self.patches = 0, pytest.MonkeyPatch()
        self.read_steps: set[int] = set()  # the optimizer steps done at each read

    def on_train_start(self, trainer: L.Trainer, *args: object) -> None:
        self.trainer = trainer
        for name in self.READS:
            self.patches.setattr(torch.Tensor, name, self.counted(getattr(torch.Tensor, name)))

    def on_train_end(self, *args: object) -> None:
        self.patches.undo()

    def counted(self, read: Callable[..., object]) -> Callable[..., object]:
        def counted_read(tensor: torch.Tensor) -> object:
            if sys._getframe(1).f_code is not GPT._check_in_vocabulary.__code__:
                self.reads += 1
                self.read_steps.add(self.trainer.global_step)
            return read(tensor)

        return counted_read


def count_host_reads(val_batches: int) -> tuple[CountHostReads, GPTLightningModule, RecordMetrics]:
    """Host reads of a 40-step run that logs every 10 steps and validates 4 times on
    ``val_batches`` batches, with its module and what it logged."""
    B, steps = 4, 40
    module = tiny_module()
    counter = CountHostReads()
    logger = RecordMetrics()
    trainer = cpu_trainer(
        max_steps=steps,
        log_every_n_steps=10,
        val_check_interval=10,
        limit_val_batches=val_batches,
        gradient_clip_val=1.0,
        logger=logger,
        callbacks=[counter, LossProgressBar(refresh_rate=10), TokenThroughputMonitor()],
        enable_progress_bar=True,  # the bar's own reads of the loss count too
    )
    trainer.fit(module, token_batches(steps, B), token_batches(val_batches, B))
    return counter, module, logger


def test_training_steps_read_the_device_only_every_few_steps(fused_adamw):
    # On CUDA every read of a device value waits for the GPU: training must not read every step,
    # nor validation every batch. (The fused AdamW matters: the CPU's unfused one reads its step
    # count every step.)
    counter, module, logger = count_host_reads(val_batches=6)
    reads = counter.reads
    assert reads <= (4 + 4) * 10, reads  # some values at each of 4 logging steps and validations
    assert count_host_reads(val_batches=2)[0].reads == reads  # none per validation batch
    # The progress bar, the logger, the throughput monitor and validation all read after the
    # same steps: the GPU's queue runs dry once every 10 steps, not at each one's own step.
    assert counter.read_steps == {10, 20, 30, 40}
    assert module.flops_per_batch == module.flops_per_token * 4 * TINY_CONTEXT  # B=4
    assert sorted(s for s, m in logger.logged.items() if "train/loss" in m) == [9, 19, 29, 39]
    factor = warmup_cosine(39, module.warmup_steps, 40, module.min_lr / module.learning_rate)
    assert logger.logged[39]["train/lr"] == pytest.approx(module.learning_rate * factor, rel=1e-6)


class SaveAtStep(L.Callback):
    """Saves a checkpoint in the middle of the epoch, after optimizer step ``step``."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args: object) -> None:
        if trainer.global_step == self.step and not self.path.exists():
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_progress_bar_counts_every_batch_of_a_resumed_run(tmp_path, accumulate):
    # Resumed inside the run's one epoch, Lightning does not start the epoch again, and its bar
    # had no total; its total also counted optimizer steps where the bar counts batches.
    checkpoint, bars = tmp_path / "mid.ckpt", []
    for resume in (None, checkpoint):
        bar = LossProgressBar(refresh_rate=1)
        trainer = cpu_trainer(
            max_steps=6,
            accumulate_grad_batches=accumulate,
            logger=False,
            enable_progress_bar=True,
            callbacks=[bar, SaveAtStep(3, checkpoint)],
        )
        trainer.fit(tiny_module(), token_batches(12 * accumulate, 4), ckpt_path=resume)
        bars.append(bar.train_progress_bar)
    for bar in bars:
        assert bar.desc.startswith("Epoch 0") and bar.n == bar.total == 6 * accumulate


def test_progress_bar_shows_losses_with_three_decimals():
    trainer = SimpleNamespace(
        loggers=[],
        progress_bar_metrics={"val/loss": 10.138, "val/perplexity": 25300.4},
        callback_metrics={"train/loss": torch.tensor(5.0642)},
    )
    metrics = LossProgressBar().get_metrics(trainer, None)
    # Not 10.10: tqdm's three significant digits, padded with a zero by Lightning.
    assert metrics == {"val/loss": "10.138", "val/perplexity": 25300.4, "train/loss": "5.064"}


@pytest.mark.parametrize(
    ("log_text", "written_later", "removed"),
    [("", None, True), ("an earlier run's lines\n", None, False), ("", "tensorboard", False)],
)
def test_a_refused_run_removes_only_a_folder_of_hydras_own_files(
    corpus, tmp_path, log_text, written_later, removed
):
    run_dir = tmp_path / "run"
    compose_run(tiny_overrides(corpus, run_dir), run_dir)
    (run_dir / ".hydra").mkdir(parents=True)  # as Hydra leaves it before the run starts
    (run_dir / f"{HydraConfig.get().job.name}.log").write_text(log_text)
    with pytest.raises(ValueError), discarded_if_refused():
        if written_later:
            (run_dir / written_later).mkdir()
        raise ValueError("refused")
    assert run_dir.exists() != removed


@pytest.mark.parametrize("earlier_run", [False, True])
def test_a_refused_run_removes_the_date_folder_made_for_it_alone(
    corpus, tmp_path, monkeypatch, earlier_run
):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "outputs" / "2026-11-26" / "12-00-00"  # Hydra's default layout
    compose_run(tiny_overrides(corpus, run_dir), run_dir)
    with read_write(HydraConfig.get()):
        HydraConfig.get().mode = RunMode.RUN
    (run_dir / ".hydra").mkdir(parents=True)
    if earlier_run:
        (run_dir.parent / "11-00-00").mkdir()
    with pytest.raises(ValueError), discarded_if_refused():
        raise ValueError("refused")
    assert not run_dir.exists()
    assert (tmp_path / "outputs").is_dir()  # not named by the time: it may be the user's
    assert (run_dir.parent / "11-00-00").is_dir() == run_dir.parent.is_dir() == earlier_run
    # A folder of the user's, named in hydra.run.dir as it is, stays.
    mine = tmp_path / "experiments" / "run1"
    compose_run(tiny_overrides(corpus, mine, f"hydra.run.dir={mine}"), mine)
    with read_write(HydraConfig.get()):
        HydraConfig.get().mode = RunMode.RUN
    (mine / ".hydra").mkdir(parents=True)
    with pytest.raises(ValueError), discarded_if_refused():
        raise ValueError("refused")
    assert not mine.exists() and mine.parent.is_dir()


@pytest.mark.parametrize("trained", [False, True])
def test_a_run_that_fails_before_its_first_step_leaves_no_folder(corpus, tmp_path, trained):
    # Unusable data come to light only once Lightning sets the data up, after the logger has
    # made its folder: nothing was trained, so nothing is kept. A run that trained keeps it.
    run_dir = tmp_path / "run"
    failure = "module.check_finite_every=1" if trained else "data.val_fraction=0.001"
    cfg = compose_run(tiny_overrides(corpus, run_dir, failure), run_dir)
    with open_dict(cfg):
        cfg.callbacks.poison = {"_target_": f"{__name__}.PoisonAtStep", "step": 1}
    (run_dir / ".hydra").mkdir(parents=True)  # as Hydra leaves it before the run starts
    (run_dir / f"{HydraConfig.get().job.name}.log").write_text("")
    with pytest.raises(NonFiniteLossError if trained else DataError):
        train(cfg)
    assert run_dir.exists() == trained
    if trained:
        assert (run_dir / "tensorboard").is_dir()  # the losses logged until the failure


def test_a_refused_run_in_a_linked_folder_leaves_it(corpus, tmp_path):
    target, run_dir = tmp_path / "target", tmp_path / "run"
    (target / ".hydra").mkdir(parents=True)
    run_dir.symlink_to(target)
    compose_run(tiny_overrides(corpus, run_dir), run_dir)
    with pytest.raises(ValueError), discarded_if_refused():
        raise ValueError("refused")
    assert (target / ".hydra").is_dir() and run_dir.is_symlink()
