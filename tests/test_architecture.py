"""The boundaries of the library (CONTRIBUTING.md): which part may import which.

Checked on the source (every import statement, including those inside functions),
so a lazy import cannot cross a boundary unnoticed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parent.parent / "chexanatomy_lib"

# part -> parts of chexanatomy_lib it must not import
FORBIDDEN = {
    "ct": ("codec", "evaluation", "vlm", "unet", "training"),
    "codec": ("ct", "evaluation", "vlm", "unet"),
    "training.py": ("ct", "codec", "evaluation", "vlm", "unet"),
    "checkpoints.py": ("ct", "codec", "evaluation", "vlm", "unet", "training"),
    "vlm": ("unet", "evaluation"),
    "unet": ("vlm", "evaluation"),
    "evaluation": ("vlm", "unet", "training"),
    "real": ("codec", "evaluation", "vlm", "unet", "training"),
    "radiograph.py": ("ct", "evaluation", "vlm", "unet", "training", "real"),
    "fewshot": ("training",),  # adapts through the models' own training code, never a loop of its own
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported chexanatomy_lib part) of every import in one file."""
    rel = path.relative_to(LIB)
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = list(rel.parent.parts)[: len(rel.parent.parts) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
                if not mod.startswith("chexanatomy_lib"):
                    continue
                mod = mod.removeprefix("chexanatomy_lib").lstrip(".")
            names = [mod] if node.module else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.removeprefix("chexanatomy_lib.") for a in node.names if a.name.startswith("chexanatomy_lib")]
        else:
            continue
        out += [(node.lineno, n.split(".")[0]) for n in names if n]
    return out


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_part_does_not_import_what_it_must_not(part):
    files = [LIB / part] if part.endswith(".py") else sorted((LIB / part).glob("*.py"))
    assert files, part
    crossings = [f"{f.relative_to(LIB)}:{line} imports {target}" for f in files for line, target in _imports(f)
                 if target in FORBIDDEN[part] or f"{target}.py" in FORBIDDEN[part]]
    assert not crossings, crossings
