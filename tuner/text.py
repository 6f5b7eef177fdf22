"""Numbers as people read them, shared by the CLI's tables and the HTML report."""

from __future__ import annotations

import math
from typing import Any


def number(value: Any) -> str:
    """4 significant digits; tiny and huge floats in scientific notation; None as blank."""
    if isinstance(value, float):
        if math.isfinite(value) and value != 0 and not 1e-3 <= abs(value) < 1e5:
            return f"{value:.3g}"
        return f"{value:.4g}"
    return "" if value is None else str(value)
