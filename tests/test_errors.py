"""How scripts report errors: one line, whatever raised it."""

import signal
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException

from llm.errors import ctrl_c_as_interrupt, one_line_errors, run_hydra_main, sentence


def test_running_out_of_memory_is_one_line_and_other_runtime_errors_are_bugs(capsys):
    with pytest.raises(SystemExit) as stopped, one_line_errors():
        raise RuntimeError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8\nmore"
        )
    assert stopped.value.code == 1
    assert capsys.readouterr().err == (
        "error: out of memory (DefaultCPUAllocator: can't allocate memory: you tried to allocate "
        "8); try a smaller batch, context or model\n"
    )
    with pytest.raises(RuntimeError, match="a bug"), one_line_errors():
        raise RuntimeError("a bug")
    with pytest.raises(SystemExit), one_line_errors():  # a GPU's, by its type
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
    assert capsys.readouterr().err == (
        "error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); try a smaller "
        "batch, context or model\n"
    )


def test_a_ctrl_c_that_lightning_made_an_exit_code_ends_as_any_ctrl_c(capsys):
    def lightning_at_ctrl_c() -> None:  # what Trainer.fit does with a KeyboardInterrupt
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)

    with pytest.raises(SystemExit) as stopped, one_line_errors(), ctrl_c_as_interrupt():
        lightning_at_ctrl_c()
    assert stopped.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"
    with pytest.raises(SystemExit) as stopped, ctrl_c_as_interrupt():  # any other exit passes
        sys.exit(3)
    assert stopped.value.code == 3


def test_a_setting_lightning_refuses_once_the_run_has_begun_is_one_line(capsys):
    with pytest.raises(SystemExit) as stopped, one_line_errors():
        raise MisconfigurationException(
            "You requested to check 0.01 of the `val_dataloader` but 0.01 * 8 < 1.\nTry at least"
        )
    assert stopped.value.code == 1
    assert capsys.readouterr().err == (
        "error: You requested to check 0.01 of the `val_dataloader` but 0.01 * 8 < 1.\n"
    )


def test_sigterm_is_an_interrupt_that_cleans_up_and_exits_143(capsys):
    handler = signal.getsignal(signal.SIGTERM)
    cleaned_up = []
    with pytest.raises(SystemExit) as stopped, one_line_errors("interrupted: nothing written"):
        try:
            signal.raise_signal(signal.SIGTERM)  # by default, the end of this process
        finally:
            cleaned_up.append(True)
    assert stopped.value.code == 143 and cleaned_up == [True]
    assert capsys.readouterr().err == "interrupted: nothing written\n"
    assert signal.getsignal(signal.SIGTERM) == handler


def test_running_out_of_memory_while_a_config_is_built_is_one_line(capsys):
    with pytest.raises(SystemExit), one_line_errors():
        instantiate({"_target_": "torch.empty", "_args_": [2**60]})  # an exabyte
    error = capsys.readouterr().err
    assert error.startswith("error: out of memory (") and error.count("\n") == 1


def test_output_cut_short_by_its_reader_ends_quietly():
    # As `python scripts/generate.py ... | head -c 20` does: each piece is printed and flushed.
    writer = "\n".join(
        [
            "from llm.errors import one_line_errors",
            "with one_line_errors():",
            "    for _ in range(100_000):",
            "        print('streamed text ' * 8, end='', flush=True)",
        ]
    )
    process = subprocess.Popen(
        [sys.executable, "-c", writer], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout.read(20) == b"streamed text stream"
    process.stdout.close()  # the reader goes away
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 1 and stderr == ""


def test_a_message_ends_as_a_sentence_unless_it_ends_in_punctuation():
    assert [sentence(t) for t in (" no stop ", "a question?", "a list:", "done.")] == [
        "no stop.",
        "a question?",
        "a list:",
        "done.",
    ]


@pytest.mark.parametrize(
    ("arguments", "sweeps", "message"),
    [
        (["--bogus"], True, "error: generate.py: unrecognized arguments: --bogus: see --help"),
        (  # Hydra takes one run of overrides: another after a flag is not read
            ["prompt=Hi", "--cfg", "job", "seed=1"],
            True,
            "unrecognized arguments: seed=1: give the flags (-m, --cfg, ...) before or after all",
        ),
        (["--config_name=x"], True, "unrecognized arguments: --config_name=x: see --help"),
        (["-m", "seed=1,2"], False, "error: generate.py runs no sweeps (--multirun would write"),
        (["seed=1,2", "hydra.mode=MULTIRUN"], False, "generate.py runs no sweeps"),
    ],
)
def test_hydras_command_line_is_read_in_one_line_before_hydra_writes_anything(
    arguments, sweeps, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["generate.py", *arguments])
    ran = []
    with pytest.raises(SystemExit) as exited:
        run_hydra_main(lambda: ran.append(True), sweeps=sweeps)
    assert exited.value.code == 1 and not ran
    assert message in capsys.readouterr().err.strip()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("arguments", "sweeps"),
    [(["-m", "seed=1,2"], True), (["-m", "--cfg", "job", "seed=1,2"], False), (["seed=1"], False)],
)
def test_what_hydra_may_run_reaches_it(arguments, sweeps, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["generate.py", *arguments])
    ran = []
    run_hydra_main(lambda: ran.append(True), sweeps=sweeps)
    assert ran == [True]
