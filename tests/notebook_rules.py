"""Rules every chapter notebook follows; used by tests/test_notebooks.py."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_NAME = re.compile(r"^\d\d_[a-z0-9_]+\.ipynb$")
MIN_STATEMENTS = 2  # a one-line body (``return x``) is too small to call a copy


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code" and source(c).strip()]


def markdown(nb: dict) -> str:
    return "\n".join(source(c) for c in nb["cells"] if c["cell_type"] == "markdown")


def _body_fingerprint(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> str | None:
    body = list(node.body)
    first = body[0] if body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        body = body[1:]  # a docstring does not make a body different
    if len(body) < MIN_STATEMENTS:
        return None
    return ast.dump(ast.Module(body=body, type_ignores=[]), annotate_fields=False)


def definitions(code: str) -> dict[str, str]:
    """Fingerprints of every function and class body defined in ``code``, by name."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return {}
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            fingerprint = _body_fingerprint(node)
            if fingerprint is not None:
                found[node.name] = fingerprint
    return found


def package_definitions() -> dict[str, str]:
    """Fingerprint -> ``module.name`` for every function and class body in aimodels."""
    index = {}
    for path in sorted((ROOT / "aimodels").rglob("*.py")):
        for name, fingerprint in definitions(path.read_text(encoding="utf-8")).items():
            index[fingerprint] = f"{path.relative_to(ROOT).as_posix()}:{name}"
    return index


def notebook_code(nb: dict) -> str:
    """The notebook's code, with IPython magics and shell lines dropped so it parses."""
    lines = []
    for cell in code_cells(nb):
        for line in source(cell).splitlines():
            lines.append("" if line.lstrip().startswith(("%", "!")) else line)
        lines.append("")
    return "\n".join(lines)


def copied_helpers(nb: dict, index: dict[str, str]) -> list[str]:
    """Definitions in the notebook whose body is the same as one in aimodels."""
    return [
        f"{name} copies {index[fp]}"
        for name, fp in definitions(notebook_code(nb)).items()
        if fp in index
    ]
