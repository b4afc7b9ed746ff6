"""llm: a mini-LLM training framework built around attention."""

from llm.model import GPT, PRESETS, GPTConfig

__all__ = ["GPT", "PRESETS", "GPTConfig"]
