"""What every command does the same way at the terminal: `--version`, plain help that fits 80
columns (click's formatter: no cut option names, no `<bool>` on flags), gRPC's own logging off
unless asked, and stderr notices that never glue onto a line stdout left open.

    app = typer.Typer(**APP_SETTINGS, help="...")
    def main() -> None:
        run_command(app, "sllm-train")          # the console script

Torch-free: the edge imports it (typer is a base dependency).
"""
from __future__ import annotations

import os
import sys

import typer

# click's own help formatter (rich_markup_mode=None), wrapped at 80 columns at most
APP_SETTINGS = dict(add_completion=False, rich_markup_mode=None, context_settings={"max_content_width": 80})
VERBOSE_FLAG = "--verbose"


def version() -> str:
    from sllm import __version__

    return __version__


def _print_version(ctx: typer.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        typer.echo(f"{ctx.info_name} (sllm) {version()}")
        raise typer.Exit()


def _common_options(
    _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, expose_value=False,
                                  help="Print sllm's version and exit."),
    _verbose: bool = typer.Option(False, VERBOSE_FLAG, expose_value=False,
                                  help="Let gRPC log its own lines (connections, TLS handshakes) on stderr; "
                                       "GRPC_VERBOSITY and GRPC_TRACE apply."),
) -> None:
    """Options every command takes without its functions seeing them (never called itself)."""


def run_command(app: typer.Typer, name: str, verbose: bool = False) -> None:
    """Run `app` as the console script `name`, with --version (and --verbose, which quiet_grpc read
    from argv before gRPC loaded): options that act before the app's code runs."""
    options = typer.Typer(add_completion=False)
    options.command()(_common_options)
    extra = [p for p in typer.main.get_command(options).params if verbose or p.name != "_verbose"]
    command = typer.main.get_command(app)
    command.params += extra
    command(prog_name=name)


def quiet_grpc(argv: list[str]) -> None:
    """gRPC core logs handshake and connection failures itself, before the one error line a command
    prints: off (GRPC_VERBOSITY=NONE, GRPC_TRACE unset) unless argv holds --verbose. Call before
    anything imports grpc."""
    if VERBOSE_FLAG in argv:
        return
    os.environ["GRPC_VERBOSITY"] = "NONE"
    os.environ.pop("GRPC_TRACE", None)


class Terminal:
    """stdout (an answer's text, written as it comes) and stderr (notices) share a terminal: a
    notice written while stdout's line is open starts on a line of its own. `midline`: the last
    stdout write did not end its line (what stdout itself holds, whatever stderr did since)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Both at the start of a line (a new run of the command)."""
        self.midline = False
        self._cursor_midline = False  # the shared terminal's cursor: stdout text since the last newline

    def out(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        if text:
            self.midline = self._cursor_midline = not text.endswith("\n")

    def notice(self, message: str, fg: str | None = None) -> None:
        if self._cursor_midline:
            message = "\n" + message
            self._cursor_midline = False
        typer.secho(message, fg=fg, err=True)
