"""The README cannot rot: its Python examples and every command that can run offline run as
written, in a folder holding the files they name, with tiny overrides for training."""

from __future__ import annotations

import base64
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import two_at_a_time
from test_train import TINY, compose_run

from llm.checkpoint import load_model, save_hf, save_model
from llm.run import train

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Commands that cannot run here, and why. Every other documented command must run.
NEEDS = {
    "gpu": "a GPU",
    "fsdp": "GPUs",
    "torchrun": "several machines",
    "srun": "SLURM",
    "trainer=ddp": "GPUs (DDP on a CPU is tested in test_train.py)",
    "cl100k_base": "a download",
    "gpt2-folder": "GPT-2's vocabulary, a download",
    "...": "a path from an earlier run",
    "../shared": "this workplace's shared files (tests never read them)",
}

FEW_STEPS = ("trainer.max_steps=", "trainer.val_check_interval=")

TEXT = "".join(f"{who} saw the {what}.\n" for who in ("Ann", "Bo") for what in ("sea", "sky")) * 60


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def commands(script: str) -> list[tuple[list[str], str | None]]:
    """The README's commands running ``scripts/<script>`` that can run here, as arguments and
    the text piped to them by ``echo``, if any."""
    found = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                echoed, _, part = part.split(" #")[0].strip().rpartition(" | ")
                words = shlex.split(part)
                if words[:2] != ["python", f"scripts/{script}"]:
                    continue
                if any(need in part for need in NEEDS):
                    continue
                if script == "prepare_data.py" and len(words) == 2:
                    continue  # no source: Tiny Shakespeare, a download
                found.append((words[1:], shlex.split(echoed)[1] if echoed else None))
    return found


def run(command: list[str], cwd: Path, stdin: str | None = None) -> None:
    result = subprocess.run(
        command, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{shlex.join(command)}\n{result.stderr[-3000:]}"


def ranks_file(path: Path) -> None:
    """A tiktoken ranks file: the 256 bytes and a few merges (a stand-in for gpt2.tiktoken)."""
    tokens = [bytes([b]) for b in range(256)] + [b"th", b"he", b"the", b" t", b" the"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(tokens)))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with every file the README's examples name, and a trained checkpoint."""
    folder = tmp_path_factory.mktemp("readme")
    for code in ("scripts", "configs"):  # the commands name scripts/... from the project root
        (folder / code).symlink_to(ROOT / code)
    for name in (
        "my_corpus.txt",
        "my_corpus/a.txt",
        "my_corpus/b.txt",
        "books/a.txt",
        "books/b.txt",
        "path/to/input.txt",
    ):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(TEXT)
    (folder / "prompt.txt").write_text("Ann saw")
    ranks_file(folder / "gpt2.tiktoken")
    ranks_file(folder / "path/to/gpt2.tiktoken")

    run_dir = folder / "outputs" / "my-run"
    overrides = [
        *TINY,
        f"data.source={folder / 'my_corpus.txt'}",
        f"data.data_dir={folder / 'data'}",
        "trainer.max_steps=3",
    ]
    train(compose_run(overrides, run_dir))
    # Moved out: a README command starts a new run in outputs/my-run, which a run's checkpoints
    # there would refuse. Its TensorBoard logs stay, for plot_run.py.
    shutil.move(run_dir / "checkpoints", folder / "checkpoints")
    model, tokenizer = load_model(folder / "checkpoints" / "last.ckpt")
    save_model(model, folder / "model.safetensors", tokenizer)
    save_hf(model, folder / "gpt2-folder", eot_token=256)
    return folder


def test_python_examples_run(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workspace)
    examples = blocks("python")
    assert len(examples) >= 4
    for example in examples:
        exec(compile(example, "README.md", "exec"), {})
    assert (workspace / "hf-folder" / "model.safetensors").is_file()  # the last example's save


@pytest.mark.slow
def test_training_commands_run(workspace: Path) -> None:
    tiny = {  # by key: the last value of each wins
        override.split("=")[0]: override
        for override in [
            *TINY,
            f"data.source={workspace / 'my_corpus.txt'}",
            f"data.data_dir={workspace / 'data'}",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
        ]
    }
    documented = commands("train.py")
    runs = []
    for number, (words, _) in enumerate(documented):
        # Tiny overrides for every key the command leaves alone, and a run of a few steps
        # whatever it asks for; its other choices stay. A folder of its own, unless it names
        # one: two runs started in the same second would share the one named by the time.
        words = [tiny[w.split("=")[0]] if w.startswith(FEW_STEPS) else w for w in words]
        given = {word.split("=")[0] for word in words if "=" in word}
        own_folder = (
            f"hydra.sweep.dir=multirun/readme-{number}"
            if "--multirun" in words
            else f"hydra.run.dir=outputs/readme-{number}"
        )
        extra = [] if "--help" in words else [o for k, o in tiny.items() if k not in given]
        if "--help" not in words and own_folder.split("=")[0] not in given:
            extra.append(own_folder)
        runs.append([sys.executable, *words, *extra])
    two_at_a_time(lambda command: run(command, workspace), runs)
    assert len(documented) >= 7, documented


@pytest.mark.slow
def test_other_commands_run(workspace: Path) -> None:
    documented = [
        (words + (["max_new_tokens=8"] if script == "generate.py" else []), stdin)
        for script in ("generate.py", "attention.py", "prepare_data.py", "plot_run.py")
        for words, stdin in commands(script)
    ]
    for words, stdin in documented:
        run([sys.executable, *words], workspace, stdin)
    assert len(documented) >= 6, documented
    assert any((workspace / "maps").glob("*.png"))
    assert (workspace / "docs" / "loss_curve.png").is_file()
