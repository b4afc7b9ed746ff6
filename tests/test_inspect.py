"""Attention pictures: figure layout and labels, what the ladder panels show, and the files and
TensorBoard events the attention script writes."""

import runpy
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import llm.inspect
from llm.inspect import (
    TOY_INPUTS,
    TOY_TOKENS,
    attention_figure,
    ladder_attention,
    ladder_figure,
    loss_curve_figure,
    model_attention_figures,
    save_figures,
    token_labels,
)
from llm.model import GPT, GPTConfig
from llm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def heat_maps(figure: Figure) -> list:
    """The panels of a figure that show an image (the colorbar's axes hold none)."""
    return [ax for ax in figure.axes if ax.get_images()]


def tick_texts(labels: list) -> list[str]:
    return [label.get_text() for label in labels]


def random_weights(n_head: int, tokens: int) -> torch.Tensor:
    scores = torch.randn(n_head, tokens, tokens).masked_fill(
        torch.ones(tokens, tokens, dtype=torch.bool).triu(1), float("-inf")
    )
    return scores.softmax(-1)


def test_attention_figure_draws_a_panel_per_head_labelled_with_the_tokens():
    tokens = [f"t{i}" for i in range(16)]
    figures_before = plt.get_fignums()
    weights = random_weights(12, 16)
    figure = attention_figure(weights, tokens, title="layer 3")
    panels = heat_maps(figure)
    assert len(panels) == 12
    assert [ax.get_title() for ax in panels] == [f"head {h}" for h in range(12)]
    assert figure.get_suptitle() == "layer 3"
    assert tick_texts(panels[0].get_yticklabels()) == tokens  # queries, left column
    assert tick_texts(panels[-1].get_xticklabels()) == tokens  # keys, bottom row
    assert torch.equal(torch.tensor(panels[5].get_images()[0].get_array()), weights[5])
    assert plt.get_fignums() == figures_before  # pyplot's global figure list is untouched


def test_attention_figure_refuses_weights_that_do_not_match_the_tokens():
    with pytest.raises(ValueError, match=r"must have shape \(heads, 5, 5\)"):
        attention_figure(random_weights(2, 4), ["a", "b", "c", "d", "e"])


def test_token_labels_show_whitespace_and_protect_dollar_signs():
    tokenizer = load_tokenizer("bytes")
    assert token_labels(tokenizer, tokenizer.encode("a\n$")) == ["a", "\\n", "\\$"]


def test_ladder_steps_differ_only_by_what_each_step_adds():
    steps = dict(ladder_attention(TOY_INPUTS))
    assert len(steps) == 13  # steps 1-3, then two heads each for steps 4 to 8
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)
    for name, weights in steps.items():
        assert weights.shape == (6, 6), name
        assert torch.allclose(weights.sum(-1), torch.ones(6)), name
    assert (steps["2 SelfAttention"][future] > 0).all()  # sees the future
    masked = steps["2 SelfAttention"].masked_fill(future, 0)  # the causal step only hides it
    assert torch.allclose(steps["3 CausalAttention"], masked / masked.sum(-1, keepdim=True))
    wrapper = [steps[f"4 MultiHeadAttentionWrapper\nhead {h}"] for h in range(2)]
    fused = [steps[f"5 MultiHeadAttention\nhead {h}"] for h in range(2)]
    # The same weights on a (1, T, d_in) batch: equal but for the last bits of other matmul shapes.
    assert torch.allclose(wrapper[0], steps["3 CausalAttention"], rtol=0, atol=1e-6)
    assert not torch.allclose(wrapper[0], wrapper[1])  # the second head has its own weights
    for h in range(2):
        assert torch.allclose(fused[h], wrapper[h], atol=1e-6)
    assert torch.equal(steps["1 simple_self_attention"], (TOY_INPUTS @ TOY_INPUTS.T).softmax(-1))
    grouped, rotary, window = (
        [steps[f"{step}\nhead {h}"] for h in range(2)]
        for step in ("6 GroupedQueryAttention", "7 RotaryAttention", "8 SlidingWindowAttention")
    )
    assert torch.allclose(grouped[0], fused[0], atol=1e-6)  # head 0 has its own keys still
    assert not torch.allclose(grouped[1], fused[1])  # head 1 now scores head 0's keys
    assert not any(torch.allclose(rotary[h], grouped[h]) for h in range(2))  # rotated
    in_reach = torch.ones(6, 6, dtype=torch.bool).tril().triu(-2)  # the last 3 tokens
    for h in range(2):
        assert (window[h][~in_reach] == 0).all()
        assert torch.allclose(window[h][:3], rotary[h][:3], atol=1e-6)  # all within reach


def test_ladder_figure_has_a_panel_per_step_and_head():
    figure = ladder_figure(TOY_INPUTS, TOY_TOKENS)
    panels = heat_maps(figure)
    assert [ax.get_title().split("\n")[0] for ax in panels][:3] == [
        "1 simple_self_attention",
        "2 SelfAttention",
        "3 CausalAttention",
    ]
    assert len(panels) == 13
    assert tick_texts(panels[0].get_yticklabels()) == TOY_TOKENS
    assert tick_texts(panels[7].get_yticklabels()) == TOY_TOKENS  # step 6 starts a row


def test_model_attention_figures_give_one_figure_per_layer(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, context_length=16, n_layer=3, n_head=2, n_embd=16))
    figures = model_attention_figures(model, load_tokenizer("bytes"), "Hi there")
    assert list(figures) == ["layer_00", "layer_01", "layer_02"]
    panels = heat_maps(figures["layer_01"])
    assert len(panels) == 2
    assert tick_texts(panels[0].get_yticklabels()) == list("Hi there")
    first_four = model_attention_figures(model, load_tokenizer("bytes"), "Hi there", max_tokens=4)
    assert tick_texts(heat_maps(first_four["layer_00"])[0].get_yticklabels()) == list("Hi t")
    with pytest.raises(ValueError, match="the prompt is empty"):
        model_attention_figures(model, load_tokenizer("bytes"), "")


def test_save_figures_writes_pngs_and_tensorboard_events(tmp_path):
    figures = {"ladder": ladder_figure(TOY_INPUTS, TOY_TOKENS)}
    paths = save_figures(figures, tmp_path / "png", tmp_path / "tb")
    assert paths == [tmp_path / "png" / "ladder.png"]
    assert paths[0].read_bytes().startswith(PNG_MAGIC)
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    run = EventAccumulator(str(tmp_path / "tb"))
    run.Reload()
    [image] = run.Images("attention/ladder")
    width, height = figures["ladder"].canvas.get_width_height()
    assert (image.width, image.height) == (width, height)
    with pytest.raises(ValueError, match="nowhere to write the figures"):
        save_figures(figures)


def test_figures_interrupted_while_drawn_leave_no_event_file(tmp_path, monkeypatch):
    figures = {"a": ladder_figure(TOY_INPUTS, TOY_TOKENS), "b": Figure()}
    drawn = llm.inspect._drawn

    def interrupted_at_b(figure: Figure):
        if figure is figures["b"]:
            raise KeyboardInterrupt
        return drawn(figure)

    monkeypatch.setattr(llm.inspect, "_drawn", interrupted_at_b)
    with pytest.raises(KeyboardInterrupt):
        save_figures(figures, tensorboard_dir=tmp_path / "tb")
    assert not (tmp_path / "tb").exists()


def test_figures_interrupted_while_written_leave_no_event_file(tmp_path, monkeypatch):
    figures = {"a": ladder_figure(TOY_INPUTS, TOY_TOKENS), "b": Figure()}
    earlier = tmp_path / "tb" / "events.out.tfevents.earlier"  # another writer's: it stays
    earlier.parent.mkdir()
    earlier.write_bytes(b"")
    add_image = SummaryWriter.add_image

    def interrupted_at_b(writer: SummaryWriter, tag: str, *args, **kwargs) -> None:
        if tag == "attention/b":
            raise KeyboardInterrupt
        add_image(writer, tag, *args, **kwargs)

    monkeypatch.setattr(SummaryWriter, "add_image", interrupted_at_b)
    for folder in (tmp_path / "tb", tmp_path / "new" / "tb"):
        with pytest.raises(KeyboardInterrupt):
            save_figures(figures, tensorboard_dir=folder)
    assert list((tmp_path / "tb").iterdir()) == [earlier]
    assert not (tmp_path / "new").exists()  # the folders it made, gone again


def run_attention_script(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["attention.py", *args])
    runpy.run_path(str(ROOT / "scripts" / "attention.py"), run_name="__main__")


def test_attention_script_writes_a_png_per_layer_for_a_checkpoint(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, context_length=16, n_layer=2, n_head=2, n_embd=16))
    state_dict = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    hyper_parameters = {
        "model": model.config.to_dict(),
        "tokenizer": {"name": "bytes", "path": None},
    }
    torch.save(
        {"state_dict": state_dict, "hyper_parameters": hyper_parameters}, tmp_path / "m.ckpt"
    )
    run_attention_script(
        monkeypatch, "model", str(tmp_path / "m.ckpt"), "Hello", "--png", str(tmp_path / "maps")
    )
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["layer_00.png", "layer_01.png"]
    assert "layer_00.png" in capsys.readouterr().out
    # A long prompt is cut to its first --max-tokens tokens (64 by default), and says so.
    run_attention_script(
        monkeypatch,
        "model",
        str(tmp_path / "m.ckpt"),
        "Hello, world! " * 8,
        "--max-tokens",
        "6",
        "--png",
        str(tmp_path / "cut"),
    )
    assert capsys.readouterr().err == "drawing the prompt's first 6 of 112 tokens (--max-tokens)\n"
    # The default 64 is more than this model's context of 16: the context is the limit.
    run_attention_script(
        monkeypatch, "model", str(tmp_path / "m.ckpt"), "Hello, world! " * 8, "--png", str(tmp_path)
    )
    err = capsys.readouterr().err
    assert err == "drawing the prompt's first 16 of 112 tokens (the model's context)\n"


def test_attention_script_reports_a_bad_checkpoint_in_one_line(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_attention_script(
            monkeypatch, "model", str(tmp_path / "missing.ckpt"), "Hi", "--png", str(tmp_path)
        )
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model file") and err.count("\n") == 1


def test_loss_curve_figure_draws_each_logged_loss(tmp_path: Path) -> None:
    with SummaryWriter(str(tmp_path)) as writer:
        for step in range(5):
            writer.add_scalar("train/loss", 5.0 - step, step)
        writer.add_scalar("val/loss", 4.5, 2)
        writer.add_scalar("val/loss", 3.5, 4)
    axes = loss_curve_figure(tmp_path).axes[0]
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert list(lines["train/loss"].get_ydata()) == [5.0, 4.0, 3.0, 2.0, 1.0]
    assert list(lines["val/loss"].get_xdata()) == [2, 4]


def test_loss_curve_figure_of_a_run_without_validation_draws_the_training_loss(tmp_path):
    with SummaryWriter(str(tmp_path)) as writer:
        writer.add_scalar("train/loss", 5.0, 0)
    lines = loss_curve_figure(tmp_path).axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["train/loss"]


def test_loss_curve_figure_refuses_a_folder_without_losses(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no train/loss or val/loss scalars"):
        loss_curve_figure(tmp_path)


def test_figures_are_not_written_over_a_file(tmp_path):
    (tmp_path / "maps").write_text("not a folder")
    figures = {"ladder": ladder_figure(TOY_INPUTS, TOY_TOKENS)}
    with pytest.raises(ValueError, match="maps is not a folder\\): set png_dir to a folder"):
        save_figures(figures, png_dir=tmp_path / "maps")
    with pytest.raises(ValueError, match="maps is not a folder\\): set tensorboard_dir to"):
        save_figures(figures, png_dir=tmp_path / "png", tensorboard_dir=tmp_path / "maps/runs")
    assert [path.name for path in tmp_path.iterdir()] == ["maps"]  # not even the PNG first
