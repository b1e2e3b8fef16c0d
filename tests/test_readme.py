"""The README's commands are the ones CI runs, its CPU example works, its links resolve, and
every python example in docs/*.md runs (on CPU through the Triton interpreter, at tiny sizes).

A docs example that cannot run here starts with a comment line `# not run: <why>` (a GPU, a
download); every other ```python block is executed. The blocks of one page run in one
subprocess (an import of torch, triton and fused_attn costs seconds), each in a fresh namespace,
so every block must be self-contained, as a reader copying it would need."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
NOT_RUN = "# not run:"


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def _python_blocks(page: Path) -> list[str]:
    """The page's ```python blocks, dedented (a block may sit inside a list item)."""
    blocks = re.findall(r"^([ \t]*)```python\n(.*?)^\1```", page.read_text(), flags=re.S | re.M)
    return [textwrap.dedent(code) for _, code in blocks]


def _runnable_blocks(page: Path) -> list[tuple[str, str]]:
    """(name, code) of each block that runs, numbered among all the page's python blocks."""
    return [(f"{page.name} python block {i + 1}", block) for i, block in enumerate(_python_blocks(page))
            if not block.lstrip().startswith(NOT_RUN)]


def _pages_with_examples() -> list[Path]:
    return [page for page in sorted(DOCS.glob("*.md")) if _runnable_blocks(page)]


# Runs each block of a page in a fresh namespace; on failure names the block and exits 1.
_RUNNER = """
import json, sys, traceback
for name, code in json.load(sys.stdin):
    try:
        exec(compile(code, name, "exec"), {"__name__": "__main__"})
    except BaseException:
        print(f"{name} failed:\\n{code}", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
    print(f"{name} ok", flush=True)
"""


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


def _section(text: str, title: str) -> str:
    """The body of the markdown section headed `title` (any level), up to the next heading."""
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#|\Z)", text, flags=re.S | re.M)
    assert match, f"no section {title!r}"
    return match.group(1)


def test_readme_gpu_results_match_the_committed_csv() -> None:
    """Until a GPU run is committed the README says so; after, it names that run's card and date."""
    from bench import report

    section = _section((ROOT / "README.md").read_text(), "Latest GPU results")
    csv_path = ROOT / "bench" / "results" / "gpu.csv"
    if not csv_path.exists():
        assert "No GPU run has been recorded yet" in section
        return
    newest = report.latest_run(report.read_csv(csv_path))
    assert str(newest[0]["date"]) in section and str(newest[0]["device"]).split(" (")[0] in section


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings (code blocks stripped: a `# comment` is no heading)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_readme_links_every_docs_page_and_every_link_resolves() -> None:
    readme = (ROOT / "README.md").read_text()
    for page in sorted(DOCS.glob("*.md")):
        assert f"](docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"
    for source in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", source.read_text()):
            if "://" in target:
                continue
            path = source.parent / target if target else source
            assert path.exists(), f"{source.name} links a missing {target}"
            if anchor:
                assert anchor in _anchors(path), f"{source.name} links {target}#{anchor}, no such heading"


@pytest.mark.parametrize("page", _pages_with_examples(), ids=lambda page: page.name)
def test_docs_python_examples_run(page: Path, tmp_path: Path) -> None:
    """Every ```python block of the page runs under TRITON_INTERPRET=1 (in a scratch directory,
    so files an example writes go there) and exits 0; the examples assert their own values."""
    blocks = _runnable_blocks(page)
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(blocks), env=env,
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr[-6000:]


def test_examples_not_run_say_why() -> None:
    """A skipped block must say why on its first line, so nothing is skipped by accident."""
    for page in sorted(DOCS.glob("*.md")):
        for block in _python_blocks(page):
            first = block.lstrip().splitlines()[0] if block.strip() else ""
            if first.startswith(NOT_RUN):
                assert len(first) > len(NOT_RUN) + 3, f"{page.name}: {first!r} gives no reason"
