"""scripts/train.py lets torch back large CPU tensors with huge pages (see llm/__init__.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# Imports the script as its run does, then counts the page faults of touching a 64 MB tensor:
# 16,384 with 4 KB pages, 32 with 2 MB ones (plus a few hundred for torch's own bookkeeping).
FAULTS_OF_A_NEW_TENSOR = f"""
import resource, runpy, torch
runpy.run_path({str(ROOT / "scripts" / "train.py")!r}, run_name="imported")
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(16 * 1024 * 1024)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    not THP_MODE.exists() or "[madvise]" not in THP_MODE.read_text(),
    reason="needs transparent huge pages on request (madvise), where the setting decides",
)
def test_train_script_backs_large_tensors_with_huge_pages() -> None:
    env = {name: value for name, value in os.environ.items() if name != "THP_MEM_ALLOC_ENABLE"}
    runs = {  # the default, and the opt-out: both at once
        setting: subprocess.Popen(
            [sys.executable, "-c", FAULTS_OF_A_NEW_TENSOR],
            env=env if setting is None else {**env, "THP_MEM_ALLOC_ENABLE": setting},
            stdout=subprocess.PIPE,
            text=True,
        )
        for setting in (None, "0")
    }
    faults = {setting: int(run.communicate()[0]) for setting, run in runs.items()}
    assert faults[None] < 2_000, faults
    assert faults["0"] > 16_000, faults
