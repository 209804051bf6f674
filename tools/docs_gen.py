"""The generated parts of the documentation, written from the code at build time so they cannot drift.

Each function returns markdown that ``tools/docs_hooks.py`` puts in place of a marker line
``<!-- generated: NAME -->`` in a page of ``docs/`` (see :data:`GENERATORS`); the tests call the same
functions (``tests/test_docs.py``), so a command, option, preset or public name added to the code
appears in the site, and a public name without a docstring fails the tests.

* ``cli``     — every command of ``flowmaps`` from the argparse parser (:func:`flowmaps.cli.main.build_parser`);
* ``config``  — every config section and key, its type and default, from the dataclasses of
  :mod:`flowmaps.runs.config` and their docstrings;
* ``presets`` — every YAML preset of ``src/flowmaps/runs/presets/``, verbatim, with its objective blocks;
* ``api``     — a mkdocstrings entry for every public name (:func:`public_names`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import pkgutil
import re
import typing
from importlib import resources

MARKER = re.compile(r"^<!-- generated: ([a-z_]+) -->[ \t]*$", re.MULTILINE)


# --------------------------------------------------------------------------- command line

def _md(text: str) -> str:
    """Plain text of a help string made safe for a markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _option_row(action: argparse.Action) -> str | None:
    if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
        return None
    if action.option_strings:
        names = ", ".join(f"`{o}`" for o in action.option_strings)
        if action.nargs != 0:
            metavar = action.metavar or action.dest.upper()
            names += f" `{metavar}`"
    else:
        names = f"`{action.metavar or action.dest}`" + (" …" if action.nargs in ("*", "+") else "")
    details = []
    if action.choices is not None and not isinstance(action.choices, dict):
        details.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
    if (action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
            and "default" not in (action.help or "")
            and not isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
        details.append(f"default `{action.default}`")
    if action.required and action.option_strings:
        details.append("required")
    help_text = _md((action.help or "") % {"default": action.default, "prog": ""} if action.help else "")
    return f"| {names} | {help_text}{' (' + '; '.join(details) + ')' if details else ''} |"


def _command_section(name: str, parser: argparse.ArgumentParser, summary: str | None) -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps usage at the terminal width: fix it for the docs
    out = [f"## `{name}`", ""]
    if summary:
        out += [_md(summary).capitalize() + ".", ""]
    if parser.description:
        out += [_md(parser.description), ""]
    usage = parser.format_usage().strip()
    out += ["```text", usage, "```", "", "| argument | meaning |", "|---|---|"]
    out += [row for row in map(_option_row, parser._actions) if row]
    if parser.epilog:
        out += ["", "```text", parser.epilog.rstrip().replace("\\\\", "\\"), "```"]
    return "\n".join(out) + "\n"


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    """``(name, parser, help)`` of each sub-command, in the parser's order."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            out += [(name, p, helps.get(name)) for name, p in action.choices.items()]
    return out


def all_commands(parser: argparse.ArgumentParser, prefix: str = "flowmaps"):
    """``(full name, parser, help)`` of every command and sub-command, depth first."""
    for name, sub, summary in subcommands(parser):
        yield f"{prefix} {name}", sub, summary
        yield from all_commands(sub, f"{prefix} {name}")


def cli_reference() -> str:
    from flowmaps.cli.main import build_parser

    parser = build_parser()
    parts = [_command_section("flowmaps", parser, None)]
    parts += [_command_section(name, p, summary) for name, p, summary in all_commands(parser)]
    return "\n".join(parts)


# --------------------------------------------------------------------------- configs and presets

def _type_name(tp) -> str:
    text = tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))
    return str(text).replace("typing.", "").replace("NoneType", "None")


def config_sections() -> list[tuple[str, type]]:
    from flowmaps.runs.config import Config

    return [(f.name, f.type if not isinstance(f.type, str) else typing.get_type_hints(Config)[f.name])
            for f in dataclasses.fields(Config) if dataclasses.is_dataclass(
                typing.get_type_hints(Config)[f.name])]


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _values(key: str) -> str:
    """The values the config checks for ``key`` (:data:`flowmaps.runs.validation.CHOICES`, ``POSITIVE``)."""
    from flowmaps.runs import validation

    if key in validation.CHOICES:
        return ", ".join(f"`{c}`" for c in validation.CHOICES[key])
    return "positive" if key in validation.POSITIVE else ""


def config_reference() -> str:
    out = []
    for section, cls in config_sections():
        hints = typing.get_type_hints(cls)
        out += [f"### `{section}`", "", inspect.getdoc(cls) or "", "",
                "| key | type | default | values |", "|---|---|---|---|"]
        rows = []
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                sub = hints[f.name]
                sub_hints = typing.get_type_hints(sub)
                rows += [(f"{section}.{f.name}.{g.name}", sub_hints[g.name], _default(g))
                         for g in dataclasses.fields(sub)]
            else:
                rows.append((f"{section}.{f.name}", hints[f.name], _default(f)))
        for key, tp, default in rows:
            out.append(f"| `{key}` | {_md(_type_name(tp))} | `{_md(repr(default))}` | {_values(key)} |")
        out.append("")
    return "\n".join(out)


def preset_files() -> dict[str, str]:
    from flowmaps.runs.config import list_presets

    folder = resources.files("flowmaps.runs") / "presets"
    return {name: (folder / f"{name}.yaml").read_text(encoding="utf-8") for name in list_presets()}


def presets_reference() -> str:
    from flowmaps.runs.config import PER_OBJECTIVE, _read_preset

    out = []
    for name, text in preset_files().items():
        _, blocks = _read_preset(name)
        lead = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            lead.append(line.lstrip("# ").rstrip())
        out += [f"### `{name}`", ""]
        if lead:
            out += [" ".join(lead), ""]
        if blocks:
            out += [f"Settings per objective (`{PER_OBJECTIVE}:`): " + ", ".join(f"`{b}`" for b in blocks)
                    + f". `flowmaps presets --show {name} --objective {next(iter(blocks))}` prints one resolved.", ""]
        out += [f"`flowmaps train --preset {name}` reads `src/flowmaps/runs/presets/{name}.yaml`:", "",
                "```yaml", text.rstrip(), "```", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- API reference

def public_modules() -> list[str]:
    """The modules whose ``__all__`` is public API: ``flowmaps``, each module named in
    ``flowmaps.__all__`` (``exact``, ``objectives``, ``teachers``) and each subpackage that defines
    ``__all__`` (``runs`` too, whose names are imported on first use: reading its ``__all__`` here
    imports them all)."""
    import flowmaps

    names = ["flowmaps"]
    for name in flowmaps.__all__:
        if inspect.ismodule(getattr(flowmaps, name)):
            names.append(f"flowmaps.{name}")
    for info in pkgutil.iter_modules(flowmaps.__path__):
        if info.ispkg and not info.name.startswith("_"):
            module = importlib.import_module(f"flowmaps.{info.name}")
            if hasattr(module, "__all__") and f"flowmaps.{info.name}" not in names:
                names.append(f"flowmaps.{info.name}")
    return names


def public_names() -> list[tuple[str, str]]:
    """``(module, name)`` for every name in the ``__all__`` of :func:`public_modules`, modules excluded
    (each is a section of its own)."""
    out = []
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if not inspect.ismodule(getattr(module, name)):
                out.append((module_name, name))
    return out


def api_reference() -> str:
    """One section per public module; each object is rendered once, where it first appears (a name
    re-exported elsewhere links back to it)."""
    seen: dict[int, str] = {}
    out = []
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        out += [f"## `{module_name}`", "", f"::: {module_name}", "    options:", "      members: false",
                "      show_root_heading: false", "      show_root_toc_entry: false", ""]
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                continue
            path = f"{module_name}.{name}"
            key = id(obj) if (inspect.isclass(obj) or inspect.isroutine(obj)) else hash(path)
            if key in seen:
                out += [f"### `{path}`", "", f"The same object as [`{seen[key]}`][{seen[key]}].", ""]
                continue
            seen[key] = path
            out += [f"::: {path}", "    options:", "      heading_level: 3", ""]
    return "\n".join(out)


GENERATORS = {"cli": cli_reference, "config": config_reference, "presets": presets_reference,
              "api": api_reference}


def expand(markdown: str) -> str:
    """Replace every ``<!-- generated: NAME -->`` line by the output of ``GENERATORS[NAME]``."""
    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise KeyError(f"unknown generated section {name!r}; known: {', '.join(GENERATORS)}")
        return GENERATORS[name]()
    return MARKER.sub(replace, markdown)
