"""The ``robustkit`` command-line interface: a click group whose commands live one per module.

Commands are imported only when they run, so ``robustkit --help`` stays instant. Errors a user causes
(:class:`~robustkit.errors.RobustkitError`) are printed as one line and exit with code 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import click

from robustkit import __version__
from robustkit.errors import RobustkitError

# command name -> (module, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "bench": ("robustkit.cli.bench", "bench", "The paper's comparison: train, attack and verify a grid; report."),
    "attack": ("robustkit.cli.attack", "attack", "Robust accuracy of a model under attacks, and their worst case."),
    "datasets": ("robustkit.cli.datasets", "datasets", "List the registered datasets."),
    "models": ("robustkit.cli.models", "models", "List the model zoo with shapes and parameter counts."),
    "report": ("robustkit.cli.report", "report", "Rebuild a bench run's tables, plots and web page; compare runs."),
    "train": ("robustkit.cli.train", "train", "Train a zoo network (standard, pgd, verifiable, mixtrain); resumable."),
    "verify": ("robustkit.cli.verify", "verify", "Verified robust accuracy of a model with the bound methods."),
    "vnnlib": ("robustkit.cli.vnnlib", "vnnlib",
               "Decide a VNN-LIB property of an ONNX network, or a VNN-COMP instances.csv; resumable."),
    "vnnlib-export": ("robustkit.cli.vnnlib", "vnnlib_export",
                      "Write a VNN-COMP robustness benchmark of a model: ONNX, VNN-LIB, instances.csv."),
}

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


class UserError(click.ClickException):
    """A one-line error caused by the user's input; exit code 2 like click's usage errors."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class Command(click.Command):
    """A command whose required parameters robustkit checks itself after parsing, whatever click's version
    does with them (some click releases skip the check for an option declared with ``default=None``).

    A required parameter whose value is missing (None, or an empty tuple for multi-value parameters) is a
    :class:`click.MissingParameter` error, which the root group prints as one line with exit code 2.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, args)
        for param in self.get_params(ctx):
            if param.required and param.name is not None and ctx.params.get(param.name) in (None, ()):
                raise click.MissingParameter(ctx=ctx, param=param)
        return rest


@dataclass(frozen=True)
class GlobalOptions:
    """The root group's shared options, available to every command as ``ctx.obj``."""

    seed: int
    device: str
    quiet: bool


class LazyGroup(click.Group):
    """A group that imports each command on first use and turns user errors into one-line exits."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, attribute, _ = COMMANDS[cmd_name]
        command: click.Command = getattr(importlib.import_module(module_name), attribute)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in COMMANDS and not args[0].startswith("-"):
            import difflib

            close = difflib.get_close_matches(args[0], list(COMMANDS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UserError(f"no such command {args[0]!r}.{hint} Commands: {', '.join(sorted(COMMANDS))}.")
        if args and args[0] in COMMANDS:
            # click imports the command's module here, before the group's callback runs, and most commands load
            # torch with it: the thread policy must be set first, for OpenMP to see its wait policy
            _configure_threads(ctx)
        return super().resolve_command(ctx, args)

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Run the CLI; in standalone mode every error is one line on stderr (usage errors exit 2)."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        except click.ClickException as exc:
            message = " ".join(exc.format_message().split())
            usage_ctx = getattr(exc, "ctx", None)
            if isinstance(exc, click.UsageError) and usage_ctx is not None:
                message += f" (see '{usage_ctx.command_path} --help')"
            click.echo(f"Error: {message}", err=True)
            sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RobustkitError as exc:
            raise UserError(str(exc)) from exc


def _configure_threads(ctx: click.Context) -> None:
    """Apply :func:`robustkit.threads.configure` with the root ``--threads`` once per invocation."""
    root = ctx.find_root()
    if root.meta.get("robustkit.threads"):
        return
    from robustkit import allocator
    from robustkit.threads import configure

    allocator.configure()
    configure(root.params.get("threads"))
    root.meta["robustkit.threads"] = True


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    import re

    if not re.match(r"^(auto|cpu|cuda(:\d+)?|mps)$", value.strip().lower()):
        raise click.BadParameter(f"{value!r} is not a device; use {DEVICE_CHOICES}")
    return value.strip().lower()


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="robustkit")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for every random generator.")
@click.option("--device", default="auto", show_default=True, callback=_check_device,
              help=f"Where to compute: {DEVICE_CHOICES}.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars, and no progress log lines (bench, train).")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="CPU threads for torch (default: the cores that other processes leave free, measured over "
                   "0.25 s: 1 on a busy machine).")
@click.pass_context
def main(ctx: click.Context, seed: int, device: str, quiet: bool, threads: int | None) -> None:
    """robustkit: train, attack and formally verify neural networks against L-inf adversaries."""
    from robustkit.progress import set_log, set_progress

    set_progress(not quiet)
    set_log(False)  # the long-running commands (bench, train) turn their log lines on
    _configure_threads(ctx)  # once per invocation; resolve_command has done it before loading a command
    ctx.obj = GlobalOptions(seed=seed, device=device, quiet=quiet)
