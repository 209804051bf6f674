"""Every example of the README and the docs runs (issue 19).

* The ``exec`` blocks of each page (``tools/docs_blocks.py``) run in order in a fresh directory, as one
  script: Python blocks share one namespace; a shell line ``flowmaps …`` runs in-process through
  :func:`flowmaps.cli.main` (which must return 0), any other line in ``bash``. The blocks carry their
  own small settings.
* Each ``examples/*.py`` runs with ``--smoke`` (a few training steps), in-process.

Pages and scripts are found at test time, so a new page or example is covered without editing this file.
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import docs_blocks  # noqa: E402

PYTHON_LANGS = {"python", "py"}


def _exec_pages() -> list[Path]:
    return [p for p in docs_blocks.pages(ROOT)
            if any(b.tag == "exec" for b in docs_blocks.blocks(p.read_text(encoding="utf-8")))]


def _shell_commands(code: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _run_shell(command: str, monkeypatch) -> None:
    from flowmaps.cli import main

    words = shlex.split(command, comments=True)
    env = {}
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if words and words[0] == "flowmaps":
        for key, value in env.items():
            if key == "PYTHONPATH":
                for entry in reversed(value.split(os.pathsep)):
                    monkeypatch.syspath_prepend(os.path.abspath(entry))
            else:
                monkeypatch.setenv(key, value)
        status = main(words[1:])
        assert status == 0, f"`{command}` exited with {status}"
        return
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    done = subprocess.run(["bash", "-c", command], env=dict(os.environ, PATH=path,
                          PYTHONPATH=str(ROOT / "src")), capture_output=True, text=True)
    assert done.returncode == 0, f"`{command}`: {done.stdout}{done.stderr}"


@pytest.mark.parametrize("page", _exec_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_exec_blocks_of_a_page_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    rel = page.relative_to(ROOT).as_posix()
    for block in docs_blocks.blocks(page.read_text(encoding="utf-8"), rel):
        if block.tag != "exec":
            continue
        if block.lang in PYTHON_LANGS:
            exec(compile(block.code, f"{rel}:{block.line}", "exec"), namespace)  # noqa: S102
        else:
            for command in _shell_commands(block.code):
                _run_shell(command, monkeypatch)


EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_an_example_script_runs_at_small_settings(script, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), "--smoke", str(tmp_path / "out")])
    runpy.run_path(str(script), run_name="__main__")
    assert capsys.readouterr().out.strip(), f"{script.name} printed nothing"


def test_there_is_an_example_per_main_use():
    names = {p.stem for p in EXAMPLES}
    assert {"quickstart", "self_distil", "diffusers_teacher", "images", "export_load"} <= names
