"""Flags every finished command shares, spelled the same everywhere."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from feature_files import write_features

from mmcli.cli.app import app

COMMANDS = ("preprocess", "extract", "info", "eval", "retrieve")


def _options(command: str) -> set[str]:
    cmd = typer.main.get_command(app).commands[command]
    return {o for p in cmd.params for o in (*p.opts, *getattr(p, "secondary_opts", ()))}


@pytest.mark.parametrize("command", COMMANDS)
def test_quiet_and_debug_everywhere(command):
    assert {"-q", "--quiet", "--debug"} <= _options(command)


@pytest.mark.parametrize("command", ["preprocess", "extract", "eval"])
def test_output_is_o_or_out(command):
    assert {"-o", "--out"} <= _options(command)


@pytest.mark.parametrize("command", ["preprocess", "extract"])
def test_overwrite_and_resume_on_commands_that_fill_a_folder(command):
    assert {"--overwrite", "--resume"} <= _options(command)


def test_info_accepts_quiet(cli, tmp_path):
    path = write_features(
        tmp_path / "f.safetensors", ["a", "b"], {"image": (np.eye(2, dtype=np.float32), [0, 1])}
    )
    r = cli("info", path, "-q", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["items"] == 2


def test_usage_errors_are_one_line_with_exit_code_2(run_mmcli):
    """Typer's usage errors (missing option, bad choice, unknown option or command) come
    out as one line naming the command, like every other bad input."""
    for args, message in (
        (["preprocess", "x"], "error: mmcli preprocess: Missing option '--out'"),
        (["extract", "x", "-o", "y", "--precision", "fp64"], "error: mmcli extract: Invalid value"),
        (["info", "--bogus"], "error: mmcli info: No such option: --bogus"),
        (["nope"], "error: mmcli: No such command 'nope'"),
    ):
        r = run_mmcli(*args)
        err = r.stderr.decode()
        assert r.returncode == 2 and r.stdout == b"", (args, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith(message), err
    r = run_mmcli("--help")
    assert r.returncode == 0 and b"preprocess" in r.stdout
