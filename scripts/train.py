"""Train a GPT: python scripts/train.py [group=option ...] [key=value ...]

Configs live in configs/ (train.yaml and its groups); see the README for recipes.
"""

# llm first: importing it lets torch back large CPU tensors with huge pages, which must be
# settled before anything allocates one (see llm/__init__.py).
import llm  # noqa: F401

# isort: split
import sys

import hydra
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from llm.errors import EXIT_CODES, one_line_errors, run_hydra_main
from llm.run import register_model_presets, resume_hint, train

register_model_presets()


@hydra.main(version_base=None, config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        stopped = train(cfg)
    if stopped is not None and stopped.checkpoint_path is not None:  # a signal stopped training
        rank_zero_only(print)(
            f"Stopped by {stopped.signal_name}; saved {stopped.checkpoint_path}. "
            f"{resume_hint(stopped.checkpoint_path)}",
            file=sys.stderr,
        )
        sys.exit(EXIT_CODES.get(stopped.signal_name, 1))


if __name__ == "__main__":
    run_hydra_main(main)
