"""The code blocks of the README and the docs, and the tags that say whether the tests run them.

Every fenced block names its language. A ``python``, ``bash`` or ``console``-like block also carries
one tag after the language:

* ``exec`` — ``tests/test_docs_examples.py`` runs it. The ``exec`` blocks of one page run in order, as
  one script, in a fresh temporary directory (Python blocks share one namespace; shell lines run in
  that directory, a ``flowmaps …`` line in-process through :func:`flowmaps.cli.main`, anything else in
  ``bash``), so a later block may use what an earlier one made. They must be quick: small settings
  written in the block itself (``train.steps=30``, ``steps=200``).
* ``norun: REASON`` — not run, for the reason given (it needs a GPU, a dataset, weights, torchrun,
  or is an excerpt that needs names from its page: say which).

Longer examples live in ``examples/*.py``; pages include them (``--8<-- "examples/NAME.py"``) and
the tests run each with ``--smoke`` (a few training steps).

``tools/docs_hooks.py`` removes the tags before the page is rendered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CODE_LANGUAGES = {"python", "py", "bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<info>[^`]*)$")
TAG = re.compile(r"^(?P<lang>[\w+-]*)(?:\s+(?P<tag>exec|norun)(?::\s*(?P<reason>.*\S))?)?\s*$")


@dataclass
class Block:
    path: str
    line: int                # 1-based line of the opening fence
    lang: str
    tag: str | None          # "exec", "norun" or None
    reason: str | None
    code: str
    info: str                # the raw info string, for error messages


def blocks(text: str, path: str = "<text>") -> list[Block]:
    """The fenced blocks of a markdown text, in order."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.group("indent"), m.group("fence"), m.group("info").strip()
        body, j = [], i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence) and lines[j].strip() == fence[0] * len(lines[j].strip())):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        t = TAG.match(info)
        lang, tag, reason = (t.group("lang"), t.group("tag"), t.group("reason")) if t else (info, None, None)
        out.append(Block(path, i + 1, lang, tag, reason, "\n".join(body) + "\n", info))
        i = j + 1
    return out


def problems(block: Block) -> str | None:
    """Why a block breaks the rule above, or None."""
    where = f"{block.path}:{block.line}"
    if not block.lang:
        return f"{where}: a fenced block without a language (use ```text for plain text)"
    if TAG.match(block.info) is None:
        return f"{where}: unreadable fence info {block.info!r}"
    if block.lang in CODE_LANGUAGES:
        if block.tag is None and included_example(block):
            return None
        if block.tag is None:
            return f"{where}: a {block.lang} block needs `exec` or `norun: REASON` after the language"
        if block.tag == "norun" and not block.reason:
            return f"{where}: `norun` needs a reason (`norun: needs a GPU`)"
    elif block.tag is not None:
        return f"{where}: only code blocks ({', '.join(sorted(CODE_LANGUAGES))}) take `{block.tag}`"
    return None


INCLUDE = re.compile(r'^--8<-- "(examples/[\w.-]+\.py)"$')


def included_example(block: Block) -> str | None:
    """The ``examples/NAME.py`` a block includes whole (its only line is the snippet), or None."""
    lines = [line.strip() for line in block.code.splitlines() if line.strip()]
    m = INCLUDE.match(lines[0]) if len(lines) == 1 else None
    return m.group(1) if m else None


def strip_tags(markdown: str) -> str:
    """The markdown with each fence's ``exec`` / ``norun: …`` tag removed (for rendering)."""
    def clean(line: str) -> str:
        m = FENCE.match(line)
        if not m:
            return line
        t = TAG.match(m.group("info").strip())
        if not t or not t.group("tag"):
            return line
        return f"{m.group('indent')}{m.group('fence')}{t.group('lang')}"
    return "\n".join(clean(line) for line in markdown.split("\n"))


def pages(root: Path) -> list[Path]:
    """The README and every page of the docs."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
