"""Lightning callbacks and plugins for training: throughput, inspection, stops, checkpoints."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from torch.distributed.fsdp import FullyShardedDataParallel

from llm.checkpoint import model_from_weights
from llm.files import atomic_path, link_atomically
from llm.generate import check_sampling, encode_prompt, generate_text
from llm.hardware import peak_flops, precision_dtype
from llm.inspect import model_attention_figures
from llm.model import GPT, own_parameter_name
from llm.tokenizer import Tokenizer
from llm.training import optimizer_stepped
from llm.values import is_positive_integer, is_whole_number

log = logging.getLogger(__name__)


class TokenThroughputMonitor(L.Callback):
    """Logs training throughput to every logger: tokens/s (``train/device/items_per_sec``),
    samples/s, batches/s and, where the device's dense peak is known (``llm.hardware.peak_flops``),
    MFU (``train/device/mfu``) from the module's ``flops_per_batch``. Lightning's ``Throughput``
    does the arithmetic, over the last ``window_size`` logging steps; validation time is left out.

    Lightning's own ThroughputMonitor waits for the GPU after every batch to time it, so the GPU
    idles while the host launches the next step. This one waits only on the steps that log
    (every ``trainer.log_every_n_steps``), where logging the loss waits for the GPU anyway; the
    rates are the same, because each reading covers every batch since the previous one.

    The running totals (``train/time``, ``train/batches``, ``train/samples``, ``train/lengths``)
    are kept in checkpoints, so a resumed run's go on from where they stopped.
    """

    def __init__(self, window_size: int = 5) -> None:
        if not is_whole_number(window_size) or window_size < 2:
            raise ValueError(
                "window_size must be a whole number >= 2 (a rate needs two readings), got "
                f"{window_size!r}"
            )
        self.window_size = window_size
        # Training time and work since the run began (a resumed run's restored from its
        # checkpoint): every reading is of these totals.
        self._batches = self._samples = self._tokens = 0
        self._seconds_before = 0.0  # up to the last pause (validation), or to the start
        self._started, self._paused = time.perf_counter(), True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        device = trainer.strategy.root_device
        self.throughput = Throughput(
            available_flops=peak_flops(device, precision_dtype(str(trainer.precision))),
            world_size=trainer.world_size,
            window_size=self.window_size,
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.throughput.reset()  # the rates start afresh; the totals go on
        self._flops_since_reading = 0
        self._started, self._paused = time.perf_counter(), False

    def state_dict(self) -> dict[str, float]:
        running = 0.0 if self._paused else time.perf_counter() - self._started
        return {
            "batches": self._batches,
            "samples": self._samples,
            "tokens": self._tokens,
            "seconds": self._seconds_before + running,
        }

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self._batches, self._samples = state_dict["batches"], state_dict["samples"]
        self._tokens, self._seconds_before = state_dict["tokens"], state_dict["seconds"]

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: tuple[torch.Tensor, torch.Tensor],
        batch_idx: int,
    ) -> None:
        inputs = batch[0]  # (B, T)
        self._batches += 1
        self._samples += inputs.size(0)
        self._tokens += inputs.numel()
        self._flops_since_reading += getattr(pl_module, "flops_per_batch", None) or 0
        logs = trainer.global_step % max(trainer.log_every_n_steps, 1) == 0
        if not (optimizer_stepped(trainer, batch_idx) and logs and trainer.is_global_zero):
            return
        self.throughput.update(
            time=self._seconds_before + self._elapsed(trainer),
            batches=self._batches,
            samples=self._samples,
            lengths=self._tokens,
            flops=self._flops_since_reading or None,
        )
        self._flops_since_reading = 0
        metrics = {f"train/{name}": value for name, value in self.throughput.compute().items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._seconds_before += self._elapsed(trainer)
            self._paused = True

    def on_train_batch_start(self, *args: Any) -> None:
        # Restart the clock after a validation here, not when it ends: callbacks that run at its
        # end (inspection, checkpoints) are not training either.
        if self._paused:
            self._started, self._paused = time.perf_counter(), False

    def _elapsed(self, trainer: L.Trainer) -> float:
        """Training seconds since the last (re)start, once the device has finished its work."""
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - self._started


class GPTSummary(ModelSummary):
    """Logs one line on the model in place of Lightning's layer table: its shape, parameters
    and training FLOPs per token. Lightning's table would list the GPT as one row, and its FLOPs
    column would read 0 (Lightning counts FLOPs only by running a sample batch through the
    model). Being a ``ModelSummary``, it keeps Lightning from adding that table; its
    ``max_depth`` has no use here."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Counted here, before FSDP (at fit start) turns the parameters into flat shards.
        if stage == TrainerFn.FITTING and isinstance(getattr(pl_module, "model", None), GPT):
            rank_zero_only(log.info)("%s", pl_module.model.summary())

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # logged at setup


class LossProgressBar(TQDMProgressBar):
    """Lightning's TQDM progress bar, showing the training loss read only when the bar redraws
    (every ``refresh_rate`` steps). Logged with ``prog_bar=True``, the loss would be read after
    every step, and every step would wait for the GPU. Losses show three decimals: tqdm's
    three significant digits, padded by Lightning, would show 10.138 as 10.10."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.fit_loop.epoch_loop.batch_progress.current.completed:
            # Resumed inside the run's one epoch, which Lightning does not start again: the bar
            # would show no epoch and no total.
            self.on_train_epoch_start(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if trainer.max_steps > 0 and trainer.max_epochs == -1:  # the run is one endless epoch
            # The bar counts the run's batches from its start, a resumed run's too: its total is
            # every batch of the run, not (as Lightning's) the optimizer steps left.
            self.train_progress_bar.total = trainer.max_steps * trainer.accumulate_grad_batches

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            metrics["train/loss"] = loss.item()
        return {
            name: f"{value:.3f}" if name.endswith("loss") and isinstance(value, float) else value
            for name, value in metrics.items()
        }


class InspectionLogger(L.Callback):
    """At every validation, logs to TensorBoard what the model does with a fixed probe text:
    its attention maps (one image per layer, a grid of heads with the probe's tokens on both
    axes) and a text sample continued from the probe's start."""

    def __init__(
        self,
        probe_text: str = "First Citizen:\nBefore we proceed any further, hear me speak.",
        max_probe_tokens: int = 24,
        sample_prompt: str = "\n",
        sample_tokens: int = 64,
        temperature: float = 0.8,
        top_k: int | None = 50,
    ) -> None:
        # Checked here, before any training, rather than at the first validation.
        for name, text in (("probe_text", probe_text), ("sample_prompt", sample_prompt)):
            if not isinstance(text, str) or not text:
                raise ValueError(f"{name} must be some text, got {text!r}")
        for name, number, minimum in (
            ("max_probe_tokens", max_probe_tokens, 1),
            ("sample_tokens", sample_tokens, 0),
        ):
            if not is_whole_number(number) or number < minimum:
                raise ValueError(f"{name} must be a whole number >= {minimum}, got {number!r}")
        check_sampling(temperature, top_k, top_p=None)
        self.probe_text = probe_text
        self.max_probe_tokens = max_probe_tokens
        self.sample_prompt = sample_prompt
        self.sample_tokens = sample_tokens
        self.temperature = temperature
        self.top_k = top_k

    def check_sample_prompt(self, tokenizer: Tokenizer, context_length: int) -> None:
        """Raise a ValueError unless the sample prompt fits the model's context: to call before
        any work, once the tokenizer is known, rather than fail at the first validation."""
        try:
            encode_prompt(tokenizer, self.sample_prompt, context_length)
        except ValueError as err:
            raise ValueError(f"the inspection's sample_prompt: {err}") from None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tensorboard = next(
            (lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None
        )
        if trainer.sanity_checking or tensorboard is None:
            return
        model = whole_model_on_rank_zero(trainer.strategy.model, pl_module.model)  # every rank
        if model is not None:
            self.log_inspection(
                tensorboard, model, trainer.datamodule.tokenizer, trainer.global_step
            )

    def log_inspection(
        self, tensorboard: TensorBoardLogger, model: GPT, tokenizer: Tokenizer, step: int
    ) -> None:
        """Log ``model``'s attention maps and a sample from it at ``step``."""
        max_tokens = min(self.max_probe_tokens, model.config.context_length)
        figures = model_attention_figures(model, tokenizer, self.probe_text, max_tokens)
        for layer, figure in enumerate(figures.values()):
            tensorboard.experiment.add_figure(f"attention/layer_{layer}", figure, step, close=True)

        generator = torch.Generator(device=model.token_embedding.weight.device).manual_seed(step)
        sample = generate_text(
            model,
            tokenizer,
            self.sample_prompt,
            max_new_tokens=self.sample_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            generator=generator,
        )
        # TensorBoard renders text as Markdown: a code block keeps line breaks and spacing.
        tensorboard.experiment.add_text("sample", f"```\n{sample}\n```", step)


def whole_model_on_rank_zero(wrapped: torch.nn.Module, model: GPT) -> GPT | None:
    """``model`` with all its weights, to run outside training, on global rank 0; None on the
    other ranks. ``wrapped`` is what the strategy made of the module that holds ``model``.

    Under FSDP each rank holds a shard of the weights, and every rank must call this: they
    gather the whole weights on rank 0, which gets a plain copy in eval mode. FSDP's own units
    cannot run there, since each of their calls outside training would wait for the others."""
    rank_zero = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if not FullyShardedDataParallel.fsdp_modules(wrapped):
        return model if rank_zero else None
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False, rank0_only=True):
        if not rank_zero:
            return None
        weights = {
            own_parameter_name(name): param.detach().clone()
            for name, param in model.named_parameters()
        }
    device = next(iter(weights.values())).device
    copy = model_from_weights(model.config, weights, "the gathered FSDP weights").to(device)
    return copy.eval()  # no dropout: as the model is in validation


def validation_due(trainer: L.Trainer) -> bool:
    """Whether a validation falls after the batch that just ended (every ``val_check_batch``
    batches of the run's one endless epoch)."""
    return (trainer.fit_loop.epoch_loop.total_batch_idx + 1) % trainer.val_check_batch == 0


def stopped_by_signal(trainer: L.Trainer) -> bool:
    """Whether ``GracefulStop`` saved ``last.ckpt`` for a signal at this step."""
    return any(isinstance(c, GracefulStop) and c.checkpoint_path for c in trainer.callbacks)


class GracefulStop(L.Callback):
    """On SIGINT (Ctrl-C) or SIGTERM, finish the current optimizer step, save ``last.ckpt`` and
    stop training, without validating first. A second Ctrl-C acts at once, as it would without
    this callback. A second SIGTERM does not: ``timeout`` and schedulers can send more than one
    at once, and after their grace period they stop a process with SIGKILL anyway.

    Stopping between steps keeps the checkpoint consistent; ``signal_name`` tells the caller
    why training ended and ``checkpoint_path`` where it was saved. A signal during a validation
    takes effect once it ends (at the step after it), and one during the last step, or its
    validation, lets the run end as planned; a warning says so at once.
    """

    def __init__(self, distributed_check_every: int = 10) -> None:
        # Under DDP every rank must agree to stop, which costs a collective; do it every few
        # steps rather than on every one.
        if not is_positive_integer(distributed_check_every):
            raise ValueError(
                "distributed_check_every must be a positive whole number of steps, got "
                f"{distributed_check_every!r}"
            )
        self.distributed_check_every = distributed_check_every
        self.signal_name: str | None = None
        self.checkpoint_path: Path | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._warned = False

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        # Only Ctrl-C gets its earlier handler back, for a second one to act at once. Checked,
        # not assumed: another signal can land while this handler runs.
        if signum == signal.SIGINT and signum in self._previous_handlers:
            signal.signal(signum, self._previous_handlers.pop(signum))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[signum] = signal.signal(signum, self._request_stop)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not optimizer_stepped(trainer, batch_idx):
            return  # mid-accumulation: gradients are not in any checkpoint
        if trainer.global_step >= trainer.max_steps:
            return  # the run ends here anyway, validated and checkpointed as usual
        stop = self.signal_name is not None
        if trainer.world_size > 1:
            if trainer.global_step % self.distributed_check_every:
                return
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        path = Path(dirpath or trainer.default_root_dir) / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # resumable: all state
        # Set once saved: a second Ctrl-C during the save must not be reported as a stop that
        # saved its checkpoint.
        self.checkpoint_path = path
        self.signal_name = self.signal_name or "a signal on another rank"
        trainer.should_stop = True
        # Lightning validates once more on any stop, which on a large validation split can take
        # minutes after a Ctrl-C, or outlast a scheduler's grace period. Only a validation due at
        # this step anyway still runs: a resumed run starts after it and would never run it.
        if not validation_due(trainer):
            trainer.limit_val_batches = 0

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        # A validation of a large split can take minutes: say at once that the signal was heard.
        if self.signal_name is not None and trainer.state.fn == TrainerFn.FITTING:
            self._warn_once(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.signal_name is not None and self.checkpoint_path is None:
            self._warn_once(trainer)

    def _warn_once(self, trainer: L.Trainer) -> None:
        """Say, once and on rank 0, what the signal heard does."""
        if self._warned or not trainer.is_global_zero:
            return
        self._warned = True
        if trainer.global_step >= trainer.max_steps:
            log.warning(
                "%s: it came in the last step, and the run ends as planned", self.signal_name
            )
            return
        again = "; Ctrl-C again stops at once" if self.signal_name == "SIGINT" else ""
        log.warning("%s: stopping once this validation ends%s", self.signal_name, again)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it and renames it into place, so an
    interrupted save never leaves a truncated ``.ckpt`` that looks valid. Lightning's own writer
    writes to the system's temporary folder and then moves the file, which on another file system
    is a copy straight into the ``.ckpt``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        with atomic_path(Path(path)) as temporary:
            super().save_checkpoint(checkpoint, temporary, storage_options)


class BestAndLastCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, with ``last.ckpt`` saved at every validation, and once.

    - Every validation: since Lightning 2.6, ``save_last`` saves only at a validation that also
      saved a top-k (best) checkpoint. A run whose validation loss stopped improving would then
      leave a ``last.ckpt`` of its best step, and a resume would lose every step after it.
    - Once: at a validation that did save the best, ``last.ckpt`` becomes a second name for that
      file (a hard link) rather than a second copy of it; with AdamW's moments, GPT-2 124M's
      checkpoint is 1.5 GB and gpt2-xl's 18 GB. A later save under either name writes a new file
      and renames it into place (``AtomicCheckpointIO``), which leaves the other name's file as
      it was. Where the file system has no hard links, the copy is saved as usual.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        keeps_several = self.save_top_k > 1 or self.save_top_k == -1
        fixed_name = self.filename is not None and "{" not in self.filename  # no {metric} in it
        if keeps_several and fixed_name and not self._enable_version_counter:
            # Each of the best would be saved over the one before: the name would hold the last.
            raise ValueError(
                f"save_top_k={self.save_top_k} keeps several checkpoints, but the filename "
                f"{self.filename!r} names one: keep save_top_k=1, or give a filename that "
                "differs between them, such as filename='best-{step}'"
            )
        self.hard_links = True  # until the file system refuses one

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # With validation off (trainer.limit_val_batches=0) Lightning would save only when
        # training ends, and a crash would lose the whole run: last.ckpt is saved where each
        # validation would have run instead, and at the last step.
        # Only at such a step is Lightning's enable_validation (an inspection of the module)
        # asked: not on every batch.
        if (
            validation_due(trainer) or trainer.global_step >= trainer.max_steps
        ) and not trainer.enable_validation:
            self._save_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's saves last.ckpt here even under trainer.fast_dev_run, which saves nothing
        # else: a smoke test would leave a checkpoint behind.
        if not trainer.fast_dev_run:
            super().on_train_end(trainer, pl_module)

    def _save_last(self, trainer: L.Trainer) -> None:
        # Skipped where Lightning saved at this step already (a best, with last.ckpt beside it),
        # and where a stop on a signal saved last.ckpt just before: a run resumed from that one
        # starts after this step's validation, as it would from a new save.
        if (
            self.save_last
            and not stopped_by_signal(trainer)
            and not self._should_skip_saving_checkpoint(trainer)
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        saved = self._last_checkpoint_saved  # the latest save's path, "" before any
        saved_now = (
            saved not in ("", filepath) and self._last_global_step_saved == trainer.global_step
        )
        if filepath != self.last_model_path or not saved_now:
            return super()._save_checkpoint(trainer, filepath)
        linked = False
        if trainer.is_global_zero and self.hard_links:  # the one rank that writes files
            try:
                link_atomically(Path(saved), Path(filepath))
                linked = True
            except OSError:
                self.hard_links = False  # not tried again
                log.info("No hard links in %s: last.ckpt is saved as a copy", self.dirpath)
        # Every rank saves, or none: under FSDP a save gathers the weights from all of them.
        if not trainer.strategy.broadcast(linked):
            super()._save_checkpoint(trainer, filepath)
