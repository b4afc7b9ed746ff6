"""The LightningModule that trains a GPT: loss, AdamW, the learning-rate schedule, logging."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields
from functools import partial
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor
from torchmetrics.aggregation import SumMetric

from llm.model import GPT, GPTConfig, own_parameter_name

# What the module logs, at every validation and every logging step: what a checkpoint callback
# may monitor.
LOGGED_METRICS = ("val/loss", "val/perplexity", "hp_metric", "train/loss", "train/lr")
# torch.compile's modes: "max-autotune*" tune the GPU kernels (a longer compile),
# "reduce-overhead" and "max-autotune" replay the step as CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# The settings whose meaning rests on another field (see _as_built).
_MEANING_RESTS_ON = {
    "n_kv_head": "n_head",
    "sliding_window": "n_layer",
    "rope_theta": "pos_embedding",
}


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """The ``GPTConfig`` fields in which a saved model (``saved``) differs from the one being
    trained (``current``): ``{field: (saved value, current value)}``. Two spellings of the same
    model do not differ (see ``_as_built``); where the field a setting's meaning rests on
    differs too, the setting's own values are given, so that taking every saved value back
    gives the saved model."""
    # Fields added to GPTConfig later are missing from older checkpoints: their defaults.
    defaults = {field.name: field.default for field in fields(GPTConfig)}
    saved, current = {**defaults, **saved}, {**defaults, **current}
    saved_built, current_built = _as_built(saved), _as_built(current)

    def differs(key: str) -> bool:
        if saved.get(key) == current.get(key):
            return False
        rests_on = _MEANING_RESTS_ON.get(key)
        return saved_built.get(key) != current_built.get(key) or (
            rests_on is not None and saved[rests_on] != current[rests_on]
        )

    return {
        key: (saved.get(key), current.get(key))
        for key in sorted(set(saved) | set(current))
        if differs(key)
    }


def _as_built(config: dict[str, Any]) -> dict[str, Any]:
    """A whole config's fields, with three settings in one spelling each of what they build:
    ``n_kv_head`` equal to ``n_head`` is None, a list of one window for every layer is that
    window, and ``rope_theta`` is None without RoPE."""
    window = config["sliding_window"]
    if isinstance(window, list | tuple):
        window = window[0] if len(set(window)) == 1 else list(window)
    return {
        **config,
        "n_kv_head": None if config["n_kv_head"] == config["n_head"] else config["n_kv_head"],
        "sliding_window": window,
        "rope_theta": config["rope_theta"] if config["pos_embedding"] == "rope" else None,
    }


def described(differences: Mapping[str, tuple[Any, Any]], saved_as: str) -> str:
    """``config_differences`` in words: ``"n_layer: 2 {saved_as}, 3 now, ..."``."""
    return ", ".join(
        f"{key}: {old!r} {saved_as}, {new!r} now" for key, (old, new) in differences.items()
    )


def check_same_model(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise a one-line ValueError naming each ``GPTConfig`` field in which a checkpoint's model
    (``saved``) differs from the one being trained (``current``)."""
    if differences := config_differences(saved, current):
        raise ValueError(
            f"The checkpoint was trained with another model config "
            f"({described(differences, 'in the checkpoint')}); "
            "resume with the same model settings or start a new run."
        )


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup from 0, then cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def dropout_seed(seed: int, rank: int, step: int, micro_batch: int) -> int:
    """The seed dropout draws its masks from for one micro-batch (``micro_batch`` counts the
    batches accumulated into optimizer step ``step``). A pure function, like the data's windows:
    each rank draws its own masks, and a resumed run draws those the uninterrupted one drew,
    with no generator state to save."""
    return int(
        np.random.SeedSequence([seed, rank, step, micro_batch]).generate_state(1, np.uint64)[0]
    )


def optimizer_stepped(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the micro-batch ``batch_idx``, just ended, completed an optimizer step (it was
    the last of ``trainer.accumulate_grad_batches``)."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0


class GPTLightningModule(L.LightningModule):
    """Trains a ``GPT`` on ``(inputs, targets)`` batches of token ids, both (B, T).

    ``model`` holds ``GPTConfig`` fields and ``tokenizer`` the ``{"name", "path"}`` the data was
    encoded with; both are saved in every checkpoint so it can be loaded on its own. The
    schedule's length is the trainer's ``max_steps``. ``seed`` seeds dropout (``dropout_seed``).
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        tokenizer: Mapping[str, Any],
        learning_rate: float = 6e-4,
        min_lr: float = 6e-5,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        compile_model: bool = False,
        compile_mode: str = "default",
        check_finite_every: int = 50,
        seed: int = 1337,
    ) -> None:
        super().__init__()
        # Every argument goes into the checkpoint. Pass plain containers (not OmegaConf nodes)
        # so that checkpoints load with torch.load(weights_only=True). Loggers get the whole
        # run config from llm.run instead of these.
        self.save_hyperparameters(logger=False)
        self.model = GPT(GPTConfig(**model))
        self.model_loss = self.model.loss  # compiled in configure_model if asked
        self.learning_rate = learning_rate
        self.min_lr = min_lr
        self.warmup_steps = warmup_steps
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.compile_model = compile_model
        self.compile_mode = compile_mode
        self.check_finite_every = check_finite_every
        self.seed = seed
        # The validation loss is a mean over every token of every rank: its sum and the token
        # count stay on the device until the end. No NaN check: torchmetrics' reads the device
        # on every batch (and would drop a NaN loss that should show).
        self.val_loss_sum = SumMetric(nan_strategy="disable")
        self.val_tokens = SumMetric(nan_strategy="disable")
        # Decay weight matrices (linear and embedding weights) only: biases and LayerNorm gains
        # set offsets and scales, and pulling them towards zero only hurts. Decided here, on the
        # whole model: under FSDP the optimizer is made after sharding, when every parameter
        # is a flat 1-D shard.
        self.decayed_names = {name for name, p in self.model.named_parameters() if p.dim() >= 2}
        self.parameter_names = {name for name, _ in self.model.named_parameters()}
        # Set once the batch shape is known; TokenThroughputMonitor reads it to compute MFU.
        self.flops_per_token = self.model.flops_per_token()
        self.flops_per_batch: int | None = None
        # Counts non-finite losses on the device; read on the host only every
        # `check_finite_every` steps so that training never waits for the GPU to report it.
        # Not a buffer: DDP copies rank 0's buffers to the other ranks at every step, and a
        # count only another rank had would be lost.
        self.nonfinite_losses = torch.zeros((), dtype=torch.long)

    def configure_model(self) -> None:
        # Only the training and validation loss is compiled (see GPT.loss): inspection and
        # generation call the model with new shapes every time and stay eager. A compiled bound
        # method is not a submodule, so parameter names, and so checkpoints, stay the same.
        if self.compile_model:
            self.model_loss = torch.compile(self.model.loss, mode=self.compile_mode)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        loss = self.model_loss(inputs, targets)
        self.nonfinite_losses += (~torch.isfinite(loss.detach())).long()
        self.flops_per_batch = self.flops_per_token * inputs.numel()
        # Neither value is read on the host here: Lightning turns every prog_bar value into a
        # number after each step (a wait for the GPU), so LossProgressBar reads the loss only when
        # it redraws; and a Python float would become a GPU tensor (a copy the GPU waits for),
        # so the learning rate is logged as a CPU tensor.
        self.log("train/loss", loss)
        self.log("train/lr", torch.tensor(self.trainer.optimizers[0].param_groups[0]["lr"]))
        return loss

    def on_fit_start(self) -> None:
        self.nonfinite_losses = self.nonfinite_losses.to(self.device)  # moved with the model

    def on_train_start(self) -> None:
        # A resumed run gets the optimizer's settings and the schedule's base learning rate back
        # from the checkpoint. The run's config decides them, as it decides the schedule's
        # shape (warmup_steps, max_steps, min_lr): a resume with a new learning rate takes it.
        optimizer = self.trainer.optimizers[0]
        schedule = self.trainer.lr_scheduler_configs[0].scheduler
        factor = schedule.lr_lambdas[0](schedule.last_epoch)
        for group, made in zip(optimizer.param_groups, self.parameter_groups(), strict=True):
            group.update(
                lr=self.learning_rate * factor,
                initial_lr=self.learning_rate,
                betas=self.betas,
                weight_decay=made["weight_decay"],
            )
        schedule.base_lrs = [self.learning_rate] * len(optimizer.param_groups)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning steps its loggers by a count in its loop state, which equals the optimizer
        # steps taken. Resumed from a checkpoint saved at a validation in the middle of the one
        # endless epoch, it restores that count one short (it takes the checkpoint for one saved
        # at an epoch's end), and every later log would land a step early.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.global_step
        # Seeds torch's generators, the GPU's too (a host-side setting: no wait for the device).
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches
        torch.manual_seed(dropout_seed(self.seed, self.global_rank, self.global_step, micro_batch))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        stepped = optimizer_stepped(self.trainer, batch_idx)
        if stepped and self.global_step % self.check_finite_every == 0:
            self.check_finite()
        if self.global_step >= self.trainer.max_steps:
            # Stopping, rather than running out of steps, makes Lightning validate once more,
            # so the last step is checkpointed and logged (unless a validation was due anyway).
            self.trainer.should_stop = True

    def on_validation_start(self) -> None:
        # A NaN loss since the last check would reach validation, and the inspection after it
        # would sample from NaN probabilities: stop here instead, with the same message.
        self.check_finite()

    def on_validation_epoch_start(self) -> None:
        # Under bf16-true or 16-true Lightning casts the whole module, these sums too: bf16 sums
        # of thousands of tokens' losses round badly, and fp16 ones overflow.
        for metric in (self.val_loss_sum, self.val_tokens):
            metric.set_dtype(torch.float32)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        loss = self.model_loss(inputs, targets)
        tokens = inputs.numel()
        self.val_loss_sum.update(loss.float() * tokens)
        # Made on the device, not copied from the host.
        self.val_tokens.update(torch.full_like(loss, tokens, dtype=torch.float32))

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss_sum.compute() / self.val_tokens.compute()  # sums over every rank
        self.val_loss_sum.reset()
        self.val_tokens.reset()
        # Weights can turn NaN in a step whose own loss was finite. Stopped here, before the
        # inspection samples from them and the checkpoint saves them (one read per validation,
        # the same on every rank).
        if not torch.isfinite(loss).item():
            raise self.diverged("validation loss")
        self.log_dict({"val/loss": loss, "val/perplexity": loss.exp()}, prog_bar=True)
        self.log("hp_metric", loss)  # the metric TensorBoard's HParams tab shows beside the config

    def check_finite(self) -> None:
        """Stop training if any loss since the start, on any rank, was NaN or infinite (reads
        the device). Every rank must call it at the same step: they stop together."""
        count = self.nonfinite_losses
        if self.trainer.world_size > 1:  # one rank stopping alone would leave the others waiting
            count = self.trainer.strategy.reduce(count.clone(), reduce_op="sum")
        if count.item():
            raise self.diverged("training loss")

    def diverged(self, loss: str) -> NonFiniteLossError:
        """The error that stops a run whose ``loss`` became NaN or infinite."""
        return NonFiniteLossError(
            f"The {loss} became NaN or infinite by step {self.global_step}, and nothing was "
            "saved from it: checkpoints saved before it are kept. Try a lower "
            "module.learning_rate, a longer module.warmup_steps, or trainer.precision=32."
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite()  # a diverged model is never saved over a good checkpoint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("model")
        if saved is not None:
            check_same_model(saved, self.hparams["model"])

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip here rather than through Lightning's precision plugin, which refuses a fused
        optimizer under any mixed precision (with fp16 its gradients would still be scaled; bf16
        has no scaling) and clipping by norm under FSDP (each rank holds a shard)."""
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm == "value":  # element by element: right for shards too
            torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
        elif isinstance(self.trainer.strategy, FSDPStrategy):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)  # the norm over every shard
        else:
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW's two groups: the weight matrices with ``weight_decay``, the rest without."""
        decayed: list[Tensor] = []
        others: list[Tensor] = []
        for wrapped_name, param in self.model.named_parameters():
            name = own_parameter_name(wrapped_name)  # FSDP wraps each Block under trainer=fsdp
            if name not in self.parameter_names:  # never guess which group a weight belongs to
                raise RuntimeError(f"{wrapped_name} is not a parameter name the GPT knows")
            if param.requires_grad:
                (decayed if name in self.decayed_names else others).append(param)
        return [
            {"params": decayed, "weight_decay": self.weight_decay},
            {"params": others, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(
            self.parameter_groups(),
            lr=self.learning_rate,
            betas=self.betas,
            # One kernel for all parameters on CUDA instead of a loop over them; not under fp16
            # loss scaling, where Lightning must unscale the gradients before clipping them.
            fused=self.device.type == "cuda" and not str(self.trainer.precision).startswith("16"),
        )
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps <= 0:
            raise ValueError("Set trainer.max_steps > 0: the learning-rate schedule needs it.")
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            partial(
                warmup_cosine,
                warmup_steps=self.warmup_steps,
                max_steps=max_steps,
                min_lr_ratio=self.min_lr / self.learning_rate,
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
