"""mkdocs hooks (``hooks:`` in ``mkdocs.yml``): the generated sections, the fence tags, the result figures.

* ``on_page_markdown``: every ``<!-- generated: NAME -->`` line becomes ``tools/docs_gen.py``'s
  ``GENERATORS[NAME]()`` (command line, configs, presets, API reference), and the ``exec`` /
  ``norun: …`` tags of the fences (``tools/docs_blocks.py``) are removed.
* ``on_files``: the figures of ``benchmarks/results/`` join the site under the same path, so a results
  page shows ``![…](../benchmarks/results/…/plot.png)`` straight from the benchmark's output.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "src")]

import docs_blocks  # noqa: E402
import docs_gen  # noqa: E402
from mkdocs.structure.files import File  # noqa: E402

FIGURES = ROOT / "benchmarks" / "results"


def on_files(files, config):
    for path in sorted(FIGURES.rglob("*.png")):
        uri = path.relative_to(ROOT).as_posix()
        files.append(File(uri, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, config, files):
    return docs_blocks.strip_tags(docs_gen.expand(markdown))
