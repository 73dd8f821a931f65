"""Notebook hygiene: every chapter has a title, committed outputs from a clean run, the
standard closing sections, folded solutions, and no helper pasted from aimodels."""

from __future__ import annotations

import configparser
import re

import pytest
import yaml
from notebook_rules import (
    NOTEBOOK_NAME,
    ROOT,
    code_cells,
    copied_helpers,
    load,
    markdown,
    package_definitions,
    source,
)

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
IDS = [p.name for p in NOTEBOOKS]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2, "expected the chapter notebooks in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_name_and_title(path):
    assert NOTEBOOK_NAME.match(path.name), f"{path.name} is not named NN_topic.ipynb"
    nb = load(path)
    first = nb["cells"][0]
    assert first["cell_type"] == "markdown"
    assert re.match(r"# \S", source(first).lstrip()), "the first cell must start with '# Title'"
    assert nb["metadata"].get("kernelspec", {}).get("language") == "python"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_executed_top_to_bottom_with_outputs_and_no_errors(path):
    cells = code_cells(load(path))
    counts = [c.get("execution_count") for c in cells]
    assert counts == list(range(1, len(cells) + 1)), "run `make execute` (fresh kernel, in order)"
    assert sum(bool(c.get("outputs")) for c in cells) >= len(cells) // 3, "outputs missing"
    errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"committed error output: {errors[0].get('ename')}"
    stderr = [
        "".join(o.get("text", ""))
        for c in cells
        for o in c.get("outputs", [])
        if o.get("name") == "stderr" and "Warning" in "".join(o.get("text", ""))
    ]
    assert not stderr, f"a committed output shows a warning: {stderr[0][:200]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_chapter_structure(path):
    nb = load(path)
    text = markdown(nb)
    for heading in ("Learning objectives", "Summary", "Exercises", "Further reading"):
        assert re.search(rf"^#+\s*{heading}", text, re.M | re.I), f"no '{heading}' section"
    assert len(re.findall(r"^###\s*Exercise \d", text, re.M)) >= 3, "fewer than 3 exercises"
    assert "{cite}" in text, "no citation in the chapter"
    assert any("# NBVAL_CHECK_OUTPUT" in source(c) for c in code_cells(nb)), "no checked output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_solutions_are_folded_in_the_book_and_in_jupyterlab(path):
    """Every solution cell is folded on the site (the ``hide-cell`` tag) and in JupyterLab and
    Notebook 7 (``jupyter.source_hidden``), so a learner sees the exercise, not the answer."""
    from aimodels.editions import solution_cells

    nb = load(path)
    solutions = solution_cells(nb)
    assert len(solutions) >= 3, "expected a solution cell after each of 3+ exercises"
    for index in solutions:
        cell = nb["cells"][index]
        metadata = cell.get("metadata", {})
        where = f"cell {index}: {source(cell)[:60]!r}"
        assert "hide-cell" in metadata.get("tags", []), f"solution not folded in the book, {where}"
        assert metadata.get("jupyter", {}).get("source_hidden") is True, (
            f"solution not folded in JupyterLab (jupyter.source_hidden), {where}")
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code" and re.search(r"\bcheck_\w+\(", source(cell)):
            assert index in solutions, f"a grader is called outside the Exercises: cell {index}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_no_helper_copied_from_aimodels(path):
    assert copied_helpers(load(path), package_definitions()) == []


def test_copy_detector_catches_a_pasted_helper():
    import inspect

    from aimodels import optim

    pasted = inspect.getsource(optim.gradient_descent).replace("def gradient_descent", "def my_gd")
    fake = {"cells": [{"cell_type": "code", "source": "import numpy as np\n" + pasted}]}
    assert copied_helpers(fake, package_definitions()) == [
        "my_gd copies aimodels/optim.py:gradient_descent"
    ]
    own = {"cells": [{"cell_type": "code", "source": "def f(x):\n    y = x + 1\n    return y\n"}]}
    assert copied_helpers(own, package_definitions()) == []


def test_toc_lists_every_notebook_and_only_existing_pages():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    files = [toc["root"]]
    for part in toc.get("parts", []):
        assert part.get("chapters"), f"part {part.get('caption')!r} has no pages"
        files += [chapter["file"] for chapter in part["chapters"]]
    for f in files:
        matches = list(ROOT.glob(f + ".*"))
        assert matches, f"_toc.yml lists {f}, which does not exist"
    listed = {f for f in files if f.startswith("notebooks/")}
    assert listed == {f"notebooks/{p.stem}" for p in NOTEBOOKS}


def test_nbval_sanitize_file_parses():
    config = configparser.ConfigParser()
    config.read(ROOT / "tests" / "nbval_sanitize.cfg")
    assert config.sections()
    for section in config.sections():
        re.compile(config[section]["regex"])
        assert "replace" in config[section]


SHOWN = re.compile(r"^`(aimodels/[\w/]+\.py)`, line (\d+):\n\n```python\n(.*?)\n```", re.S)
ANY_SHOWN = re.compile(r"^`([^`]+)`, line \d+:\n\n```python\n")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_displayed_source_is_current(path):
    """Code shown with show_source must still be the package's code at that line."""
    shown = 0
    for cell in code_cells(load(path)):
        for output in cell.get("outputs", []):
            markdown_text = "".join(output.get("data", {}).get("text/markdown", ""))
            match = SHOWN.match(markdown_text)
            if not match:
                shown_elsewhere = ANY_SHOWN.match(markdown_text)
                assert not shown_elsewhere, (
                    f"{path.name} shows source from {shown_elsewhere.group(1)}, not from "
                    "aimodels/: a decorated function was not unwrapped")
                continue
            file, line, code = match.group(1), int(match.group(2)), match.group(3)
            current = (ROOT / file).read_text(encoding="utf-8").splitlines()
            block = code.splitlines()
            assert current[line - 1 : line - 1 + len(block)] == block, (
                f"{path.name} shows an outdated {file}:{line}; run `make execute`")
            shown += 1
    if "show_source(" in "".join(source(c) for c in code_cells(load(path))):
        assert shown, "show_source cells have no rendered source output"


CITE = re.compile(r"\{cite(?::\w+)?\}`([^`]+)`")
BIB_KEY = re.compile(r"^@\w+\{([^,\s]+),", re.M)


def test_every_cited_key_is_in_the_bibliography():
    """A missing key fails only the strict book build, at the very end of `make test`."""
    keys = set(BIB_KEY.findall((ROOT / "book" / "references.bib").read_text(encoding="utf-8")))
    pages = [(p.name, markdown(load(p))) for p in NOTEBOOKS]
    pages += [(p.name, p.read_text(encoding="utf-8")) for p in (ROOT / "book").glob("*.md")]
    missing = {(name, key.strip()) for name, text in pages for group in CITE.findall(text)
               for key in group.split(",") if key.strip() not in keys}
    assert not missing, f"cited but not in book/references.bib: {sorted(missing)}"
    assert len(keys) > 100
