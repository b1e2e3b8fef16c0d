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


def test_readme_main_job_installs_what_the_benchmark_needs() -> None:
    import tomllib

    main_job = 'pip install torch==2.13.0 -e ".[bench]" && python -m bench.run'
    assert main_job in [block.strip() for block in _bash_blocks()]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("matplotlib") for dep in extras["bench"])


def test_readme_gpu_results_match_the_committed_csv() -> None:
    """Until a GPU run is committed the README says so; after, it names that run's card and date."""
    from bench import report

    section = (ROOT / "README.md").read_text().split("### Latest GPU results", 1)[1].split("\n### ", 1)[0]
    csv_path = ROOT / "bench" / "results" / "gpu.csv"
    if not csv_path.exists():
        assert "No GPU run has been recorded yet" in section
        return
    newest = report.latest_run(report.read_csv(csv_path))
    assert str(newest[0]["date"]) in section and str(newest[0]["device"]).split(" (")[0] in section
