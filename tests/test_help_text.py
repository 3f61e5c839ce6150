"""Help text is documentation: every word of it reaches the reader.

typer renders help with rich markup, which silently eats anything that looks like a tag
(``mmcli[faiss]``, ``[rows,L]``, ``[default: none]``). Every help string must come out
as written: square brackets escaped (``\\[``) where rich would take them for markup.
"""

from __future__ import annotations

import re

import click
import pytest
import typer
from rich.text import Text

from mmcli.cli.app import app


def _commands() -> dict[str, click.Command]:
    group = typer.main.get_command(app)
    return dict(group.commands)  # type: ignore[attr-defined]


def _texts(cmd: click.Command):
    yield "(command)", cmd.help or ""
    for p in cmd.params:
        yield p.name, getattr(p, "help", None) or ""


@pytest.mark.parametrize("name", sorted(_commands()))
def test_no_help_string_loses_words_to_markup(name):
    cmd = _commands()[name]
    for where, text in _texts(cmd):
        shown = Text.from_markup(text).plain
        assert shown == text.replace("\\[", "["), f"{name} {where}: markup ate part of {text!r}"


def _plain_help(runner_cli, name: str) -> str:
    r = runner_cli(name, "--help")
    assert r.exit_code == 0
    return re.sub(r"[\s│╭╮╰╯─]+", " ", r.stdout)


@pytest.mark.parametrize("name", sorted(_commands()))
def test_rendered_help_keeps_bracketed_words(cli, name):
    """What a person sees keeps each bracketed word of the help strings."""
    shown = _plain_help(cli, name)
    for where, text in _texts(_commands()[name]):
        for word in re.findall(r"\S*\\\[[^\]\s]*\]\S*", text):
            visible = word.replace("\\[", "[")
            assert visible in shown.replace(" ", "") or visible in shown, (name, where, visible)
