"""Every `sorakit ...` command shown in the docs, the READMEs and the recipes' opening comments names a
real command and real options, and a documented recipe with its `--set` overrides loads and
validates. (The smoke run and the stage tests run the commands themselves; this catches the docs
drifting from the CLI.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from sorakit.cli import load_commands
from sorakit.cli.app import app
from sorakit.config import load_config

REPO = Path(__file__).resolve().parents[1]
DOCS = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md", *sorted((REPO / "recipes").rglob("README.md"))]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
# Words that stand for something the reader fills in, not a command or option.
PLACEHOLDER = re.compile(r"^(\.\.\.|[A-Z][A-Z0-9_]*|<.*>)$")


def _code_spans(text: str) -> list[str]:
    """Fenced and indented code blocks (continuation lines joined) and inline `code`."""
    spans, fenced = [], False
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    "):
            spans.append(re.sub(r"(^|\s)#.*", "", line))  # shell comments are prose
        else:
            spans += re.findall(r"`([^`]+)`", line)
    return spans


def _recipe_comments(text: str) -> list[str]:
    return [line.lstrip("# ") for line in text.splitlines() if line.startswith("#")]


def documented_commands() -> list[tuple[str, str]]:
    found = []
    sources = [(p, _code_spans(p.read_text())) for p in DOCS] + [(p, _recipe_comments(p.read_text())) for p in RECIPES]
    for path, spans in sources:
        for span in spans:
            # A command starts a line, or follows a prompt, a pipe, a path or an environment setting.
            for m in re.finditer(r"(?:^\s*|[$(;&|/]\s*|=\S+\s+)(sorakit(?: [^|;&#>]*)?)", span):
                found.append((str(path.relative_to(REPO)), m.group(1).strip()))
    return found


COMMANDS = documented_commands()
load_commands()
CLI = typer.main.get_command(app)  # a click command tree (typer ships its own click)


def _words(command: str) -> list[str]:
    try:
        words = shlex.split(command)
    except ValueError:  # an unbalanced quote in prose-like code ("..."): fall back to whitespace
        words = command.split()
    return [w for w in map(_unbracket, words[1:]) if w]


def _unbracket(word: str) -> str:
    """`[--flag` / `VALUE]` of an optional part lose the bracket; `patch=[1,4,4]` keeps its own."""
    if word.startswith("[") and word.count("[") > word.count("]"):
        word = word[1:]
    if word.endswith("]") and word.count("]") > word.count("["):
        word = word[:-1]
    return word


def _option_names(cmd) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


def test_the_docs_show_commands():
    assert len(COMMANDS) > 50
    assert any(c.startswith("sorakit train dit --config recipes/toy/dit.yaml") for _, c in COMMANDS)


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_documented_command_exists_and_its_options_do(where, command):
    cmd, words, path = CLI, _words(command), []
    while hasattr(cmd, "commands") and words and words[0] in cmd.commands:
        path.append(words[0])
        cmd = cmd.commands[words.pop(0)]
    if hasattr(cmd, "commands"):  # a group is fine only when the doc leaves the subcommand open
        assert not words or PLACEHOLDER.match(words[0]) or words[0] in ("-h", "--help"), \
            f"{where}: `{command}`: no command {words[0]!r} under `sorakit {' '.join(path)}`"
        return
    known = _option_names(cmd) | {"-h", "--help"}
    for w in words:
        if w.startswith("-") and not re.fullmatch(r"-\d.*", w):
            assert w.split("=")[0] in known, f"{where}: `{command}`: `sorakit {' '.join(path)}` has no option {w}"
    if path[:1] == ["train"] and "--config" in words:
        recipe = REPO / words[words.index("--config") + 1]
        if recipe.exists():  # the recipe and every documented override load and validate
            overrides = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--set" and words[i + 1] != "key=value"]
            load_config(_train_config_class(path[1]), recipe, overrides)


def _train_config_class(stage: str) -> type:
    import importlib

    module = importlib.import_module(f"sorakit.training.{stage}")
    (cls,) = [v for k, v in vars(module).items() if k.lower() == f"train{stage}config"]  # TrainDiTConfig, ...
    return cls
