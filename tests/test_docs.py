"""The documentation site (issue 19): it builds offline with warnings as errors, its generated references
cover the code, every code block says whether the tests run it, and the README fits on a few screens.

The references are derived from the code at test time (``tools/docs_gen.py``): a new command, option,
preset, config key or public name is covered without editing this file, and a public name without a
docstring fails here. The examples themselves run in ``tests/test_docs_examples.py``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import docs_blocks  # noqa: E402
import docs_gen  # noqa: E402

README_MAX_LINES = 250


def test_the_site_builds_offline_with_warnings_as_errors(tmp_path):
    """``mkdocs build --strict`` (what ``make docs`` runs): a broken link or anchor, a page missing from
    the nav, a failed include or a docstring mkdocstrings cannot render fails the build."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), NO_MKDOCS_2_WARNING="1")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    site = tmp_path / "site"
    for page in ("index", "getting-started", "objectives", "cli", "configs", "api", "results/index"):
        assert (site / f"{page}.html").is_file(), page
    assert list((site / "benchmarks" / "results").rglob("*.png")), "the result figures are in the site"
    api = (site / "api.html").read_text(encoding="utf-8")
    tables = api.count('<span class="doc-section-title">Parameters:</span>')
    assert tables >= 10, f"the Args: sections render as parameter tables (docstring_style: google): {tables}"
    assert 'id="flowmaps.runs.run_training"' in api
    print(f"mkdocs build --strict: {seconds:.1f} s")


# --------------------------------------------------------------------------- API reference

@functools.lru_cache(maxsize=1)
def _griffe_package():
    """The package as mkdocstrings sees it (griffe, static analysis: a constant's docstring is the string
    literal under its assignment)."""
    import griffe

    return griffe.load("flowmaps", search_paths=[str(ROOT / "src")], resolve_aliases=True,
                       resolve_external=False)


def _griffe_docstring(path: str, package=None) -> str:
    package = package or _griffe_package()
    root = package.path
    obj = package[path.removeprefix(f"{root}.")] if path != root else package
    target = obj.final_target if getattr(obj, "is_alias", False) else obj
    return target.docstring.value.strip() if target.docstring else ""


def _coverage_problems(reference: str, names: list[tuple[str, str]], modules: list[str]) -> list[str]:
    """What is wrong with the API reference ``reference`` for the public ``(module, name)`` pairs and
    the ``modules``: each must have a docstring and an entry (its own, or a link to where the same
    object is rendered)."""
    problems = []
    for module, name in names:
        path = f"{module}.{name}"
        if not _griffe_docstring(path):
            problems.append(f"{path}: no docstring")
        if f"::: {path}\n" not in reference and f"### `{path}`" not in reference:
            problems.append(f"{path}: not in the API reference")
    for module in modules:
        if not _griffe_docstring(module):
            problems.append(f"{module}: no docstring")
        if f"::: {module}\n" not in reference:
            problems.append(f"{module}: not in the API reference")
    return problems


def test_the_public_names_are_derived_from_the_code():
    import flowmaps

    modules = docs_gen.public_modules()
    assert modules[0] == "flowmaps"
    for name in flowmaps.__all__:
        obj = getattr(flowmaps, name)
        if isinstance(obj, type(flowmaps)):
            assert f"flowmaps.{name}" in modules
    for sub in ("nets", "teachers", "objectives", "data", "metrics", "train", "runs", "cli"):
        assert f"flowmaps.{sub}" in modules, sub
    names = docs_gen.public_names()
    assert ("flowmaps", "FlowMap") in names and ("flowmaps.objectives", "LSD") in names
    assert ("flowmaps.runs", "run_training") in names and ("flowmaps.runs", "load_config") in names


def test_every_public_name_has_a_docstring_and_an_entry():
    """Each name in ``flowmaps.__all__`` and in each public module's ``__all__`` has a docstring (as
    mkdocstrings reads it: for a constant, the string literal under its assignment) and an entry in
    the generated API reference."""
    problems = _coverage_problems(docs_gen.api_reference(), docs_gen.public_names(),
                                  docs_gen.public_modules())
    assert not problems, "\n".join(problems)


def test_the_runs_names_are_checked_like_the_other_subpackages(tmp_path):
    """``flowmaps.runs`` imports its public names on first use (PEP 562); the reference and the check
    above still see each one through the ``TYPE_CHECKING`` imports griffe reads. The check fails when
    the runs section is missing from the page, and when a name of such a lazy ``__all__`` has no
    docstring."""
    import griffe

    import flowmaps.runs

    names = [(m, n) for m, n in docs_gen.public_names() if m == "flowmaps.runs"]
    assert [n for _, n in names] == flowmaps.runs.__all__
    assert {"load_config", "run_training", "evaluate_runs", "load_model", "export_model", "reconstruct",
            "tune_run_grids"} <= set(flowmaps.runs.__all__)
    reference = docs_gen.api_reference()
    assert not _coverage_problems(reference, names, ["flowmaps.runs"])
    before, after = reference.split("## `flowmaps.runs`\n", 1)
    without_runs = before + after[after.index("\n## `"):]
    problems = _coverage_problems(without_runs, names, ["flowmaps.runs"])
    assert len(problems) == len(names) + 1 and all("not in the API reference" in p for p in problems)

    package = tmp_path / "lazy_pkg"
    (package / "runs").mkdir(parents=True)
    (package / "__init__.py").write_text('"""A package."""\n')
    (package / "runs" / "__init__.py").write_text(
        '"""Lazy names."""\nfrom typing import TYPE_CHECKING\n__all__ = ["documented", "bare"]\n'
        "if TYPE_CHECKING:\n    from .impl import bare, documented\n")
    (package / "runs" / "impl.py").write_text(
        'def documented():\n    """Has one."""\n\n\ndef bare():\n    pass\n')
    lazy = griffe.load("lazy_pkg", search_paths=[str(tmp_path)], resolve_aliases=True,
                       resolve_external=False)
    assert _griffe_docstring("lazy_pkg.runs.documented", lazy) == "Has one."
    assert _griffe_docstring("lazy_pkg.runs.bare", lazy) == ""


# --------------------------------------------------------------------------- command line, configs, presets

def test_the_cli_reference_has_every_command_and_option():
    from flowmaps.cli.main import build_parser

    reference = docs_gen.cli_reference()
    commands = list(docs_gen.all_commands(build_parser()))
    assert {f"flowmaps {c}" for c in ("train", "distill", "sample", "evaluate", "export", "presets")} <= {
        c for c, _, _ in commands}
    for name, parser, _ in commands:
        section = reference.split(f"## `{name}`\n", 1)[1].split("\n## `flowmaps", 1)[0]
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:
                continue
            for option in action.option_strings:
                assert f"`{option}`" in section, (name, option)


def test_the_config_reference_has_every_key():
    from flowmaps.runs.config import Config, to_dict

    reference = docs_gen.config_reference()
    flat = []

    def walk(d, prefix):
        for key, value in d.items():
            if isinstance(value, dict) and key != "kwargs":
                walk(value, f"{prefix}{key}.")
            else:
                flat.append(f"{prefix}{key}")
    walk({k: v for k, v in to_dict(Config()).items() if isinstance(v, dict)}, "")
    assert len(flat) > 100
    for key in flat:
        assert f"| `{key}` |" in reference, key


def test_the_preset_reference_has_every_preset_verbatim():
    from flowmaps.runs.config import list_presets

    reference = docs_gen.presets_reference()
    for name, text in docs_gen.preset_files().items():
        assert f"### `{name}`" in reference and text.rstrip() in reference, name
    assert set(docs_gen.preset_files()) == set(list_presets())


def test_the_generated_sections_all_have_a_place():
    pages = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs").rglob("*.md"))
    for name in docs_gen.GENERATORS:
        assert f"<!-- generated: {name} -->" in pages, name
    with pytest.raises(KeyError):
        docs_gen.expand("<!-- generated: nothing -->")


# --------------------------------------------------------------------------- code blocks, README

def test_every_code_block_runs_or_says_why_not():
    errors, counts = [], {"exec": 0, "norun": 0, "include": 0}
    for page in docs_blocks.pages(ROOT):
        for block in docs_blocks.blocks(page.read_text(encoding="utf-8"), str(page.relative_to(ROOT))):
            problem = docs_blocks.problems(block)
            if problem:
                errors.append(problem)
            if block.tag:
                counts[block.tag] += 1
            elif docs_blocks.included_example(block):
                counts["include"] += 1
                assert (ROOT / docs_blocks.included_example(block)).is_file(), block
    assert not errors, "\n".join(errors)
    assert counts["exec"] >= 8 and counts["include"] >= 3, counts


def test_the_block_rules_catch_untagged_code():
    text = "```python\nx = 1\n```\n\n```bash norun:\nmake\n```\n\n```\nplain\n```\n\n```text exec\nno\n```\n"
    found = [docs_blocks.problems(b) for b in docs_blocks.blocks(text, "t.md")]
    assert all(found) and len(found) == 4, found
    ok = "```python exec\nx = 1\n```\n```bash norun: needs a GPU\nx\n```\n```python\n--8<-- \"examples/a.py\"\n```\n"
    assert [docs_blocks.problems(b) for b in docs_blocks.blocks(ok, "t.md")] == [None, None, None]
    assert docs_blocks.strip_tags("```bash norun: needs a GPU\n```python exec\n") == "```bash\n```python\n"


def test_the_readme_fits_on_a_few_screens_and_links_into_the_docs():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES, len(text.splitlines())
    assert "make demo" in text and "make test" in text
    import re

    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", text)
    assert len(links) >= 10, links
    for link in links:
        assert (ROOT / link).is_file(), link
    figures = re.findall(r"\]\((benchmarks/results/[^)]+)\)", text)
    for figure in figures:
        assert (ROOT / figure).is_file(), figure


def test_every_page_is_in_the_nav():
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]

    def files(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from files(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from files(value)
    listed = set(files(nav))
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert pages == listed, (pages - listed, listed - pages)


def test_docs_tools_are_pinned_alike_in_the_makefile_and_pyproject():
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["docs"]
    makefile = (ROOT / "Makefile").read_text()
    for requirement in extra:
        assert requirement in makefile, requirement
    for name in ("mkdocs", "mkdocs-material", "mkdocstrings", "mkdocstrings-python"):
        module = importlib.import_module({"mkdocs-material": "material", "mkdocstrings-python":
                                          "mkdocstrings_handlers.python"}.get(name, name))
        assert module is not None
