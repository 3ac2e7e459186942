"""The one place that knows where the grammar and the library live.

Installed wheels carry them inside the package (pyproject force-include);
a source checkout has them at the top level of the repository.
"""
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _find(name):
    for candidate in (_HERE / name, _HERE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"lossdsl: cannot find the {name}/ folder next to {_HERE}")


GRAMMAR = _find("grammar") / "lossdsl.lark"
LIBRARY = _find("library")
