"""Prepared token files read back as batches: windows of tokens for training and validation.

``TrainWindows`` and ``ValWindows`` are plain ``torch.utils.data`` datasets over numpy memmaps
of the ``.bin`` files that ``llm.data.prepare`` writes, and ``TokenDataModule`` wraps
everything for Lightning: it prepares the data when needed, then serves and resumes batches.
"""

from __future__ import annotations

import signal
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from llm.data import DataError, check_tokenizer, dataset_name, prepare, read_meta
from llm.tokenizer import Tokenizer, load_tokenizer

# --- Datasets --------------------------------------------------------------------------------


class _TokenWindows(Dataset[tuple[Tensor, Tensor]]):
    """Windows of ``context_length + 1`` tokens from one split's memmapped token file, each
    returned as inputs ``x`` and targets ``y`` (int64, shifted by one token)."""

    def __init__(self, dataset_dir: str | Path, split: str, context_length: int) -> None:
        meta = read_meta(dataset_dir)
        self.path = Path(dataset_dir) / f"{split}.bin"
        self.dtype = np.dtype(meta["dtype"])
        self.context_length = context_length
        self.num_tokens = meta["tokens"][split]
        if context_length < 1:
            raise DataError(f"context_length must be at least 1, got {context_length}")
        if self.num_tokens < context_length + 1:
            raise DataError(
                f"the {split} split of {dataset_dir} has {self.num_tokens} tokens, fewer than "
                f"one window of context_length + 1 = {context_length + 1}: use a larger corpus"
                f"{', a larger data.val_fraction' if split == 'val' else ''} or a smaller "
                "model.context_length"
            )
        self.tokens = self._open()

    def _open(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))

    # A DataLoader worker started by spawn (macOS, Windows) receives the dataset pickled;
    # pickling a memmap would copy the whole corpus, so workers reopen the file instead.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "tokens"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.tokens = self._open()

    def window(self, offset: int) -> tuple[Tensor, Tensor]:
        """Inputs and targets of the window that starts at token ``offset``."""
        chunk = torch.from_numpy(
            self.tokens[offset : offset + self.context_length + 1].astype(np.int64)
        )
        return chunk[:-1], chunk[1:]


class TrainWindows(_TokenWindows):
    """Training samples: windows at random offsets of the train split.

    Sample ``i`` is a pure function of ``(seed, rank, i)``: its offset is drawn from
    ``numpy.random.default_rng([seed, rank, i])``. Runs with the same seed see the same
    samples, distributed ranks see different ones, and order does not depend on the number of
    DataLoader workers.

    The dataset is map-style and practically endless (``len`` is 2**62), so one Lightning epoch
    lasts the whole run; bound training by steps. Resuming is trivial: with ``start=k`` item
    ``i`` is sample ``k + i``, so a run that consumed ``k`` samples per rank (batches done ×
    batch size) continues exactly where it stopped. Under DDP keep Lightning from wrapping the
    dataset in a DistributedSampler (``Trainer(use_distributed_sampler=False)``): ranks already
    differ, and that sampler would list all 2**62 indices.
    """

    ENDLESS = 2**62

    def __init__(
        self,
        dataset_dir: str | Path,
        context_length: int,
        seed: int = 0,
        rank: int = 0,
        start: int = 0,
    ) -> None:
        super().__init__(dataset_dir, "train", context_length)
        self.seed = seed
        self.rank = rank
        self.start = start

    def __len__(self) -> int:
        return self.ENDLESS - self.start

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range")
        rng = np.random.default_rng([self.seed, self.rank, self.start + index])
        # Offsets 0 .. num_tokens - context_length - 1 keep the whole window inside the file.
        return self.window(int(rng.integers(self.num_tokens - self.context_length)))


class ValWindows(_TokenWindows):
    """Validation samples: consecutive windows covering the val split, the same every time.

    Window ``j`` starts at token ``j * context_length``, so its targets continue exactly where
    the previous window's stopped and every token but the first is predicted once.

    Distributed, each of ``world_size`` ranks takes every ``world_size``-th window from window
    ``rank``, and every rank as many: under FSDP each step is a collective that all ranks must
    take. So up to ``world_size - 1`` windows at the end go unused.
    """

    def __init__(
        self, dataset_dir: str | Path, context_length: int, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__(dataset_dir, "val", context_length)
        self.rank, self.world_size = rank, world_size
        windows = (self.num_tokens - 1) // context_length
        if windows < world_size:
            raise DataError(
                f"the val split of {dataset_dir} has {windows} windows of context_length "
                f"{context_length} tokens, fewer than the {world_size} ranks that share them: use "
                "a larger data.val_fraction or corpus, or a smaller context_length"
            )
        self.windows_per_rank = windows // world_size

    def __len__(self) -> int:
        return self.windows_per_rank

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range")
        return self.window((self.rank + index * self.world_size) * self.context_length)


# --- Lightning -------------------------------------------------------------------------------


class TokenDataModule(L.LightningDataModule):
    """Batches of ``(x, y)`` token windows for training and validation.

    Takes plain values, so Hydra can build it from config. ``prepare_data`` tokenizes the
    source when its ``.bin`` files are missing or stale; ``setup`` opens them and checks they
    match the tokenizer. Training needs ``vocab_size`` (and ``tokenizer``, to decode samples).

    Resuming: every checkpoint holds the samples each rank has used (``state_dict``), and a
    resumed run's loader starts at that sample of each rank, so it continues exactly where the
    checkpoint stopped (see ``TrainWindows``), with another ``batch_size`` or number of ranks
    too. Without a trainer the loader starts at ``train_set.start`` (0 unless set).
    """

    def __init__(
        self,
        source: str = "tinyshakespeare",
        data_dir: str = "data",
        tokenizer_name: str = "gpt2",
        tokenizer_path: str | None = None,
        context_length: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 1337,
        val_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        self.source = str(source)  # a folder named 2024 comes from the command line as a number
        self.data_dir = str(data_dir)  # as source
        self.tokenizer_name = tokenizer_name
        self.tokenizer_path = tokenizer_path
        self.context_length = context_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_fraction = val_fraction
        self.restored_samples: int | None = None  # a resumed run's, from its checkpoint
        self.first_step = 0  # the optimizer step the train loader started at
        self.train_set: TrainWindows | None = None
        self.val_set: ValWindows | None = None

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the text is encoded with (loaded once, on first use)."""
        return load_tokenizer(self.tokenizer_name, self.tokenizer_path)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size: the model's ``vocab_size``."""
        return self.tokenizer.vocab_size

    @property
    def dataset_dir(self) -> Path:
        """The folder of the source's prepared token files, under ``data_dir``."""
        return Path(self.data_dir) / dataset_name(self.source)

    def prepare_data(self) -> None:
        prepare(self.source, self.tokenizer, self.data_dir, self.val_fraction)

    def setup(self, stage: str | None = None) -> None:
        check_tokenizer(read_meta(self.dataset_dir), self.tokenizer, self.dataset_dir)
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        self.train_set = TrainWindows(self.dataset_dir, self.context_length, self.seed, rank)
        self.val_set = ValWindows(self.dataset_dir, self.context_length, rank, world_size)

    def train_dataloader(self) -> DataLoader:
        # Lightning restores the checkpoint (load_state_dict, the step) before it asks for this.
        trainer = self.trainer
        if self.train_set is not None and trainer:
            self.first_step = trainer.global_step
            if self.restored_samples is not None:
                self.train_set.start = self.restored_samples
            else:  # a new run, or one resumed from a checkpoint without the count
                self.train_set.start = self._samples_in(trainer.global_step)
        return self._loader(self.train_set)

    def state_dict(self) -> dict[str, int]:
        """The train samples each rank has used: checkpoints are taken between optimizer steps,
        each of ``accumulate_grad_batches`` batches."""
        trainer = self.trainer
        if self.train_set is None or trainer is None:
            return {}
        used = self._samples_in(trainer.global_step - self.first_step)
        return {"samples_used": self.train_set.start + used}

    def _samples_in(self, steps: int) -> int:
        """The train samples one rank takes in ``steps`` optimizer steps."""
        return steps * self.trainer.accumulate_grad_batches * self.batch_size

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.restored_samples = state_dict["samples_used"]

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def _loader(self, dataset: Dataset | None) -> DataLoader:
        if dataset is None:
            raise DataError("call setup() before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),  # pinned host memory copies to the GPU faster
            persistent_workers=self.num_workers > 0,
            # Every new iterator draws a worker seed from this generator. Left to the global
            # one, validation loaders would shift dropout's random stream and a resumed run
            # would no longer repeat an uninterrupted one. Windows never depend on it.
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=leave_stop_signals_to_the_main_process,
        )


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """Makes a DataLoader worker ignore SIGINT and SIGTERM. Ctrl-C, ``timeout`` and schedulers
    signal the whole process group; a worker they killed would make the main process raise at
    once, before it saves the checkpoint the signal asks for. The loader still shuts its workers
    down, and a worker whose main process died exits by itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
