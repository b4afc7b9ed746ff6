"""Pictures of attention, what each token attends to as heat maps, and of training.

- ``attention_figure``: one layer's maps, a panel per head, tokens labelled on both axes.
- ``model_attention_figures``: those figures for every layer of a model reading a prompt.
- ``ladder_figure``: one panel per step of the attention ladder (``llm.attention``) on a toy
  input, showing what each variant computes and what each step changes.
- ``loss_curve_figure``: a training run's train and validation losses, from its TensorBoard logs.
- ``save_figures``: figures to PNG files, a TensorBoard run, or both.

Figures are built as ``matplotlib.figure.Figure`` objects rendered by the Agg backend, never
through pyplot, so no global figure list grows and nothing needs closing. In every map, row t
is query token t and column s the key token s it attends to; rows sum to 1.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from llm.attention import (
    CausalAttention,
    GroupedQueryAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    RotaryAttention,
    SelfAttention,
    SlidingWindowAttention,
    copy_wrapper_into_fused,
    simple_self_attention,
)
from llm.files import atomic_path, check_folder, made_folder
from llm.generate import encode_prompt
from llm.model import GPT
from llm.tokenizer import Tokenizer

LADDER_HEADS = 2  # heads of the ladder figure's multi-head steps

# The six-token example of the design notes (tests/test_attention.py uses it too): a 3-d
# embedding for each token, small enough to read every weight off the ladder's pictures.
TOY_TOKENS = ["These", "are", "random", "words", "and", "embeddings"]
TOY_INPUTS = torch.tensor(
    [
        [0.35, 0.15, 0.89],
        [0.97, 0.80, 0.30],
        [0.65, 0.34, 0.24],
        [0.20, 0.87, 0.34],
        [0.86, 0.13, 0.05],
        [0.10, 0.20, 0.30],
    ]
)


def attention_figure(weights: Tensor, tokens: list[str], title: str = "") -> Figure:
    """One layer's attention maps (n_head, T, T) as a grid of heads, labelled with the T
    ``tokens`` on both axes."""
    if weights.dim() != 3 or weights.size(1) != weights.size(2) or weights.size(1) != len(tokens):
        raise ValueError(
            f"attention weights must have shape (heads, {len(tokens)}, {len(tokens)}) for "
            f"{len(tokens)} tokens, got {tuple(weights.shape)}"
        )
    maps = [(f"head {head}", weights[head]) for head in range(weights.size(0))]
    return _maps_figure(maps, tokens, columns=math.ceil(math.sqrt(len(maps))), title=title)


def model_attention_figures(
    model: GPT, tokenizer: Tokenizer, prompt: str, max_tokens: int | None = None
) -> dict[str, Figure]:
    """``attention_figure`` of every layer of ``model`` reading ``prompt`` (its first
    ``max_tokens`` tokens, if given), by name (``layer_00``, ``layer_01``, ...)."""
    device = model.token_embedding.weight.device
    context_length = model.config.context_length
    idx = encode_prompt(tokenizer, prompt, context_length, device, max_tokens)  # (1, T)
    maps = model.attention_weights(idx)[:, 0]  # (n_layer, n_head, T, T)
    tokens = token_labels(tokenizer, idx[0].tolist())
    return {
        f"layer_{layer:02d}": attention_figure(maps[layer], tokens, title=f"layer {layer}")
        for layer in range(maps.size(0))
    }


def ladder_attention(inputs: Tensor) -> list[tuple[str, Tensor]]:
    """The (T, T) attention weights each ladder step computes for ``inputs`` (T, d_in), titled.

    The steps share weights where they can, so that each picture differs from the one before
    only by what its step adds: the causal step reuses the self-attention projections (it only
    hides the future), the wrapper's first head is the causal step, and the fused module holds
    the wrapper's heads (it computes the same weights, only faster). Grouped-query attention
    keeps the fused module's queries and gives every head its first head's keys and values;
    RoPE then rotates those queries and keys, and the sliding window keeps a band of T // 2.
    """
    T, d_in = inputs.shape
    d_head = 2  # small, as in the design notes' example
    num_heads = LADDER_HEADS
    d_out = d_head * num_heads
    batch = inputs[None]  # (1, T, d_in): the multi-head steps stack heads along dim 1
    with torch.random.fork_rng():  # seeded weights, without touching the global generator
        torch.manual_seed(0)
        plain = SelfAttention(d_in, d_head)
        causal = CausalAttention(d_in, d_head, context_length=T, dropout=0.0)
        wrapper = MultiHeadAttentionWrapper(d_in, d_out, T, 0.0, num_heads)
        fused = MultiHeadAttention(d_in, d_out, T, 0.0, num_heads)
        grouped = GroupedQueryAttention(d_in, d_out, T, 0.0, num_heads, num_kv_heads=1)
        rotary = RotaryAttention(d_in, d_out, T, 0.0, num_heads, num_kv_heads=1)
        window = SlidingWindowAttention(
            d_in, d_out, T, 0.0, num_heads, num_kv_heads=1, window=max(1, T // 2)
        )
    causal.load_state_dict(plain.state_dict())
    wrapper.heads[0].load_state_dict(causal.state_dict())
    copy_wrapper_into_fused(wrapper, fused)
    with torch.no_grad():
        # The fused projection's rows: every head's queries, then keys, then values.
        queries, keys, values = fused.qkv.weight.split(d_out)
        grouped.qkv.weight.copy_(torch.cat([queries, keys[:d_head], values[:d_head]]))
        grouped.out_proj.load_state_dict(fused.out_proj.state_dict())
    rotary.load_state_dict(grouped.state_dict())
    window.load_state_dict(grouped.state_dict())
    with torch.no_grad():
        steps = [
            ("1 simple_self_attention", simple_self_attention(inputs, return_weights=True)[1]),
            ("2 SelfAttention", plain(inputs, return_weights=True)[1]),
            ("3 CausalAttention", causal(inputs, return_weights=True)[1]),
        ]
        for name, module in (
            ("4 MultiHeadAttentionWrapper", wrapper),
            ("5 MultiHeadAttention", fused),
            ("6 GroupedQueryAttention", grouped),
            ("7 RotaryAttention", rotary),
            ("8 SlidingWindowAttention", window),
        ):
            weights = module(batch, return_weights=True)[1][0]  # (nh, T, T)
            steps += [(f"{name}\nhead {head}", weights[head]) for head in range(num_heads)]
    return steps


def ladder_figure(inputs: Tensor, tokens: list[str]) -> Figure:
    """One figure with a panel per step of the attention ladder (a panel per head for the
    multi-head steps) on the toy input ``inputs`` (T, d_in) labelled by ``tokens``."""
    if inputs.dim() != 2 or inputs.size(0) != len(tokens):
        raise ValueError(
            f"the toy input must have shape ({len(tokens)}, d_in) for {len(tokens)} tokens, "
            f"got {tuple(inputs.shape)}"
        )
    maps = ladder_attention(inputs)
    # Steps 1 to 5 on the first row (three panels, then one per head for steps 4 and 5), the
    # modern steps 6 to 8 on the second.
    columns = 3 + 2 * LADDER_HEADS
    return _maps_figure(maps, tokens, columns=columns, title="The attention ladder")


def token_labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Each token as a readable axis label: control characters escaped as in Python strings,
    a token that ends inside a multi-byte character shown with U+FFFD."""
    texts = (tokenizer.token_bytes(i).decode("utf-8", "replace") for i in ids)
    # "$" would start matplotlib's math mode.
    return [repr(text)[1:-1].replace("$", r"\$") for text in texts]


def loss_curve_figure(tensorboard_dir: str | Path) -> Figure:
    """The losses a training run logged to TensorBoard (``<run>/tensorboard``), against step:
    ``train/loss`` and ``val/loss`` (which a run without validation did not log)."""
    tags = ("train/loss", "val/loss")
    if not Path(tensorboard_dir).is_dir():
        raise FileNotFoundError(
            f"no TensorBoard logs at {tensorboard_dir}: give a training run's output folder"
        )
    events = EventAccumulator(str(tensorboard_dir))
    events.Reload()
    logged = [tag for tag in tags if tag in events.Tags()["scalars"]]
    if not logged:
        raise ValueError(
            f"{tensorboard_dir} holds no {' or '.join(tags)} scalars: is it from a training run?"
        )
    figure = Figure(figsize=(6.4, 3.6))
    axes = figure.add_subplot()
    for tag in logged:
        points = events.Scalars(tag)
        steps, values = [p.step for p in points], [p.value for p in points]
        axes.plot(steps, values, label=tag, marker="o" if len(points) < 30 else None)
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats per token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def save_figures(
    figures: dict[str, Figure],
    png_dir: str | Path | None = None,
    tensorboard_dir: str | Path | None = None,
) -> list[Path]:
    """Write each figure to ``png_dir/<name>.png`` and/or to a TensorBoard run in
    ``tensorboard_dir`` (tag ``attention/<name>``); returns the PNG paths."""
    if png_dir is None and tensorboard_dir is None:
        raise ValueError(
            "nowhere to write the figures: give a PNG folder, a TensorBoard folder, or both"
        )
    for folder, setting in ((png_dir, "png_dir"), (tensorboard_dir, "tensorboard_dir")):
        if folder is not None:
            check_folder(folder, setting)
    paths = []
    if png_dir is not None:
        for name, figure in figures.items():
            paths.append(Path(png_dir) / f"{name}.png")
            with atomic_path(paths[-1]) as tmp:
                figure.savefig(tmp, dpi=120, format="png")
    if tensorboard_dir is not None:
        # Drawn before the event file is made, so that an error or Ctrl-C while drawing (seconds,
        # for a large model's figures) leaves no event file without the figures in it.
        images = {name: _drawn(figure) for name, figure in figures.items()}
        folder = Path(tensorboard_dir)
        with made_folder(folder):
            before = set(folder.glob("events.out.tfevents.*"))
            try:
                with SummaryWriter(str(folder)) as writer:
                    for name, image in images.items():
                        writer.add_image(f"attention/{name}", image, dataformats="HWC")
            except BaseException:  # while writing: no event file short of figures is left
                for event_file in set(folder.glob("events.out.tfevents.*")) - before:
                    event_file.unlink()
                raise
    return paths


def _drawn(figure: Figure) -> np.ndarray:
    """``figure`` drawn as an (H, W, 3) uint8 image, as TensorBoard's ``add_figure`` draws it."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3]


def _maps_figure(
    maps: list[tuple[str, Tensor]], tokens: list[str], columns: int, title: str
) -> Figure:
    """Heat maps of (T, T) weights in a grid with ``columns`` panels a row; token labels on the
    left column (queries) and under the lowest panel of each column (keys)."""
    rows = math.ceil(len(maps) / columns)
    panel = 1.2 + 0.16 * len(tokens)  # inches: room for the labels plus the cells
    figure = Figure(figsize=(columns * panel + 1.0, rows * panel + 0.6), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    positions = range(len(tokens))
    for index, ax in enumerate(axes.flat):
        if index >= len(maps):
            ax.set_axis_off()
            continue
        name, weights = maps[index]
        image = ax.imshow(weights.detach().float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(name, fontsize=8)
        # Ticks only on the outer panels: each tick is an artist, and hundreds of them would
        # make the figure several times slower to lay out and draw.
        bottom, left = index + columns >= len(maps), index % columns == 0
        ax.set_xticks(
            positions if bottom else [], tokens if bottom else [], rotation=90, fontsize=6
        )
        ax.set_yticks(positions if left else [], tokens if left else [], fontsize=6)
    figure.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    figure.supxlabel("key: the token attended to", fontsize=8)
    figure.supylabel("query: the token attending", fontsize=8)
    if title:
        figure.suptitle(title)
    return figure
