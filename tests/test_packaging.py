"""How the checkout's folders meet other installed packages."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_checkouts_kernels_folder_does_not_shadow_an_installed_kernels_package(tmp_path: Path) -> None:
    """transformers >= 5.25 depends on Hugging Face's `kernels` and imports it when installed; with
    the checkout's root first on sys.path (as under `python -m pytest`), `import kernels` found
    fused_attn's kernels/ folder instead and transformers failed to import
    (`cannot import name 'CUDAProperties' from 'kernels'`)."""
    installed = tmp_path / "site" / "kernels"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("CUDAProperties = 'the installed package'\n")
    script = ("import sys; sys.path[:0] = ['', sys.argv[1]]\n"
              "from kernels import CUDAProperties; print(CUDAProperties)\n"
              "import fused_attn.kernels.attention\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "site")], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "the installed package"


def test_without_an_installed_kernels_package_the_folder_reads_as_not_installed() -> None:
    """transformers' check: no version and no installed distribution means not available."""
    script = ("import sys; sys.path.insert(0, '')\n"
              "import kernels; print(getattr(kernels, '__version__', 'N/A'), hasattr(kernels, 'CUDAProperties'))\n")
    # -S: without site-packages, where transformers >= 5.25 installs Hugging Face's kernels
    result = subprocess.run([sys.executable, "-S", "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "N/A False"
