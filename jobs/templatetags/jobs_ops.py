import math
from typing import Any

from django import template

register = template.Library()


@register.filter
def get(mapping: Any, key: str) -> Any:
    return (mapping or {}).get(key)


@register.filter
def age(seconds: float) -> str:
    """'never' for +Inf, else the largest unit: 45 s, 12 min, 3 h."""
    if seconds is None or math.isinf(seconds):
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"
