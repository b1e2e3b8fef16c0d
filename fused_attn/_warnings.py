"""One warn-once helper for every module that warns about a call it hands elsewhere."""
from __future__ import annotations

import warnings
from typing import Hashable


def warn_once(seen: set[Hashable], key: Hashable, message: str, *, category: type[Warning] = UserWarning,
              stacklevel: int = 2) -> None:
    """Warn `message` unless `key` is already in `seen`; `stacklevel` counts from the caller of
    warn_once, as in `warnings.warn`. Each module keeps its own `seen` set, so a test can reset
    one module's warnings."""
    if key not in seen:
        seen.add(key)
        warnings.warn(message, category, stacklevel=stacklevel + 1)
