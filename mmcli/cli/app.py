"""The ``mmcli`` application: wires one module per command. Imports no torch."""

from __future__ import annotations

import sys

import typer

from mmcli import __version__
from mmcli.cli import caption, distill, eval, extract, fuse_train, info, preprocess, retrieve

app = typer.Typer(
    name="mmcli",
    help=(
        "Multimodal (image, text, audio) representation learning from the terminal: "
        "preprocess -> extract -> fuse-train -> distill -> eval / retrieve / caption."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mmcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    pass


app.command("preprocess")(preprocess.preprocess)
app.command("extract")(extract.extract)
app.command("fuse-train")(fuse_train.fuse_train)
app.command("distill")(distill.distill)
app.command("info")(info.info)
app.command("eval")(eval.eval_command)
app.command("retrieve")(retrieve.retrieve)
app.command("caption")(caption.caption)


def main() -> None:
    from typer.exceptions import TyperException

    from mmcli.cpu import tune_malloc

    tune_malloc()  # before torch allocates anything (see its docstring)

    try:
        code = app(prog_name="mmcli", standalone_mode=False)
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    except TyperException as e:
        ctx = getattr(e, "ctx", None)
        if getattr(e, "exit_code", 1) != 2 or type(e).__name__ == "NoArgsIsHelpError":
            e.show()  # type: ignore[attr-defined]
            sys.exit(getattr(e, "exit_code", 1))
        # a usage error (missing option, bad value, unknown option): one line, exit 2
        command = ctx.command_path if ctx is not None else "mmcli"
        sys.stderr.write(f"error: {command}: {e.format_message()} (see {command} --help)\n")
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
