"""Every script answers bad input with one line naming the problem, never a traceback."""

import os
import runpy
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import two_at_a_time
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]


# (script, arguments, what its one line of error says)
CASES = [
    ("bench_train.py", ["--preset", "gpt5"], "Unknown model preset 'gpt5'"),
    ("bench_attention.py", ["--heads", "5"], "--dim (256) must be divisible by --heads (5)"),
    ("bench_data.py", ["--text", "missing.txt"], "missing.txt"),
    (
        "bench_data.py",
        ["--text", sys.executable, "--ranks", sys.executable],  # a binary file
        f"--text {sys.executable} is not UTF-8",
    ),
    ("bench_train.py", ["--steps", "0"], "--steps: must be a whole number >= 1, got '0'"),
    ("bench_train.py", ["--device", "tpu"], "device must be auto, cpu, cuda or cuda:N"),
    ("bench_generate.py", ["--new-tokens", "0"], "--new-tokens: must be a whole number >= 1"),
    ("bench_attention.py", ["--bogus"], "error: bench_attention.py: unrecognized arguments"),
    ("attention.py", [], "error: attention.py: the following arguments are required"),
    ("plot_run.py", ["missing-run", "--png", "pictures"], "no TensorBoard logs at"),
    ("attention.py", ["model", "missing.ckpt", "Hello", "--png", "maps"], "not found"),
    (
        "attention.py",  # checked before the model is loaded
        ["model", "missing.ckpt", "Hello", "--tensorboard", sys.executable],
        f"--tensorboard: cannot write in {sys.executable} ({Path(sys.executable).resolve()} is "
        "not a folder); give a folder you can write",
    ),
    ("plot_run.py", ["missing-run", "--png", ""], "--png: an empty path is no folder"),
    ("prepare_data.py", ["missing.txt", "--tokenizer", "bytes"], "not found"),
    (  # a glob the shell expanded
        "prepare_data.py",
        ["a.txt", "b.txt", "--tokenizer", "bytes"],
        'one source at a time, got 2: quote a glob ("books/*.txt")',
    ),
    ("generate.py", ["checkpoint=missing.ckpt", "prompt=Hi"], "model file missing.ckpt"),
    ("generate.py", ["temperatur=0", "prompt=Hi"], "Key 'temperatur' is not in struct"),
    ("generate.py", ["-m", "prompt=Hi", "seed=1,2"], "runs no sweeps (--multirun would write"),
]


@pytest.mark.slow
def test_bad_input_is_one_line(tmp_path):
    def run(case: tuple[int, tuple[str, list[str], str]]) -> subprocess.CompletedProcess:
        number, (script, arguments, _) = case
        folder = tmp_path / str(number)  # each in a folder of its own, to see it write nothing
        folder.mkdir()
        return subprocess.run(
            [sys.executable, str(ROOT / "scripts" / script), *arguments],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=120,
        )

    results = two_at_a_time(run, enumerate(CASES))
    for number, ((script, arguments, message), result) in enumerate(
        zip(CASES, results, strict=True)
    ):
        case = (script, *arguments, result.stderr)
        assert result.returncode in (1, 2), case  # 2: argparse's own usage errors
        assert "Traceback" not in result.stderr and "usage:" not in result.stderr, case
        last_line = result.stderr.strip().splitlines()[-1]  # after any warnings a library printed
        assert last_line.startswith("error: ") and message in last_line, case
        assert list((tmp_path / str(number)).iterdir()) == [], case  # nothing written


def test_generate_help_lists_its_settings_not_trainings():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "max_new_tokens: 200" in result.stdout and "top_p: null" in result.stdout
    assert "trainer" not in result.stdout and "Configuration groups" not in result.stdout


# generate.py's own checks, in-process: its one line for any of them is tested above.
GENERATE_CASES = [
    (["device=cuda:x"], "device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    (["checkpoint=null"], "no model: give checkpoint=PATH"),
    (["prompt=true"], "prompt was read as True (bool), not text: put it in quotes, inside the"),
    (["+max_new_token=5"], "max_new_token is not a setting, and nothing would read it"),
    (["max_new_tokens=many"], "max_new_tokens must be a positive integer, got 'many'"),
    (["top_p=2"], "top_p must be a number in (0, 1] or null, got 2"),
    (["device=null"], "device must be auto, cpu, cuda or cuda:N, got None"),
    (["dtype=[bfloat16]"], "dtype must be auto, float32, bfloat16, float16, got ['bfloat16']"),
    (["tokenizer=bytes"], "tokenizer holds settings (tokenizer.path), not one value: override"),
]


@pytest.mark.parametrize(("overrides", "message"), GENERATE_CASES)
def test_generate_refuses_bad_settings_before_loading(overrides, message):
    run = runpy.run_path(str(ROOT / "scripts" / "generate.py"), run_name="imported")["run"]
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        cfg = compose("generate", ["checkpoint=missing.ckpt", "prompt=Hi", *overrides])
    with pytest.raises(ValueError) as refused:
        run(cfg)
    assert message in str(refused.value)


def test_generate_reads_a_prompt_file_that_is_a_pipe(tmp_path):
    read_prompt = runpy.run_path(str(ROOT / "scripts" / "generate.py"), run_name="imported")[
        "read_prompt"
    ]
    pipe = tmp_path / "pipe"  # as the shell's prompt_file=<(echo ...) gives /dev/fd/N
    os.mkfifo(pipe)
    # A daemon: were the pipe never opened for reading, the writer would wait in open() for ever.
    writer = threading.Thread(target=pipe.write_text, args=("Héllo",), daemon=True)
    writer.start()
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        from_pipe, from_folder = (
            compose("generate", ["checkpoint=model.ckpt", f"prompt_file={path}"])
            for path in (pipe, tmp_path)
        )
    assert read_prompt(from_pipe) == "Héllo"
    writer.join(timeout=10)
    assert not writer.is_alive()
    with pytest.raises(FileNotFoundError, match="not found, or a folder"):
        read_prompt(from_folder)


def test_bench_scripts_check_their_input_before_printing(tmp_path, monkeypatch, capsys):
    text = tmp_path / "nul.txt"  # UTF-8, but prepare() refuses NUL bytes; any file for --ranks,
    # which is read after the text is checked
    bench_data = ROOT / "scripts" / "bench_data.py"
    text.write_bytes(b"hello\x00world\n")
    result = subprocess.run(
        [sys.executable, str(bench_data), "--text", str(text), "--ranks", str(text)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"error: --text {text} holds NUL bytes; give a text file\n"

    # Without the dev extra's transformers, the comparison with it says what to install.
    bench_generate = runpy.run_path(str(ROOT / "scripts" / "bench_generate.py"))["main"]
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    monkeypatch.setattr(sys, "argv", ["bench_generate.py", "--new-tokens", "1"])
    with pytest.raises(SystemExit) as stopped:
        bench_generate()
    assert stopped.value.code == 1
    assert 'pip install -e ".[dev]"' in capsys.readouterr().err


def test_bench_attention_keeps_the_sizes_given_beside_gpt2(monkeypatch, capsys):
    bench_attention = runpy.run_path(str(ROOT / "scripts" / "bench_attention.py"))["main"]
    arguments = ["--gpt2", "--batch", "1", "--tok", "8", "--dim", "24", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", ["bench_attention.py", *arguments, "--device", "cpu"])
    bench_attention()
    assert "B=1 T=8 d=24 heads=12," in capsys.readouterr().out  # the heads from --gpt2
