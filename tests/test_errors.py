"""How scripts report errors: one line, whatever raised it."""

import pytest
from hydra.utils import instantiate

from llm.errors import one_line_errors


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


def test_running_out_of_memory_while_a_config_is_built_is_one_line(capsys):
    with pytest.raises(SystemExit), one_line_errors():
        instantiate({"_target_": "torch.empty", "_args_": [2**60]})  # an exabyte
    error = capsys.readouterr().err
    assert error.startswith("error: out of memory (") and error.count("\n") == 1
