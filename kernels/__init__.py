"""fused_attn's Triton kernels, installed as `fused_attn.kernels` (pyproject's package-dir mapping).

In a checkout whose root is on sys.path (`python -m pytest` from the root puts it there), this
folder can also be found as a top-level `kernels` module, and shadow Hugging Face's `kernels`
package (a transformers >= 5.25 dependency that transformers imports when it is installed).
Imported under that name, this module hands the import on to the installed package, so
`import kernels` means what it would without this checkout; without one, it stays empty, which
transformers reads as "not installed"."""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _installed = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _installed  # the import statement returns this module
        _spec.loader.exec_module(_installed)
