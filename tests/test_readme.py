"""The README's commands are the ones CI runs, and its CPU example works."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_test_command_is_what_ci_runs() -> None:
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert any(block.strip() == ci_command for block in _bash_blocks()), ci_command


def test_readme_cpu_example_runs() -> None:
    block = next(b for b in _bash_blocks() if b.startswith("TRITON_INTERPRET=1 python -c"))
    code = block.split('"', 1)[1].rsplit('"', 1)[0]
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    shape, err = result.stdout.split(") tensor(")
    assert "torch.Size([1, 4, 97, 24]" in shape
    assert float(err.split(")")[0]) < 1e-5
