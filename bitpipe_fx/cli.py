"""The `bitpipe-fx` console script (also ``python -m bitpipe_fx``): a thin dispatcher over sub-command modules.

Each sub-command lives next to the layer it drives and exposes ``add_parser(subparsers, name, help)``,
which registers its arguments and sets ``func``. Every error is one line on stderr (the traceback too with
``--debug``): exit 2 for a usage or configuration error, 1 for a failure while running, 130 for Ctrl-C, 143
for SIGTERM (the launcher stops every rank first).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import NoReturn

from bitpipe_fx import __version__
from bitpipe_fx.errors import BitPipeError, PipelineRuntimeError, Terminated

# name -> (module that implements it, imported lazily so `simulate` never imports torch; its one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("bitpipe_fx.sim.command", "compare schedules in the event simulator (no torch needed)"),
    "inspect": ("bitpipe_fx.passes.command", "print a model's plan (stages, costs, placement, balance) for a schedule"),
    "partition": ("bitpipe_fx.passes.command", "compute a model's plan for a schedule and save it as JSON"),
    "train": ("bitpipe_fx.train", "train a model with a pipeline schedule on local processes or under torchrun"),
    "demo": ("bitpipe_fx.train", "a few-minute pipelined training run on local CPU processes, with its pictures"),
    "export": ("bitpipe_fx.train.export_command", "write a run's trained weights: safetensors or a HF folder"),
    "sample": ("bitpipe_fx.train.sample", "generate text from a byte-level LM run's checkpoint"),
}
EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 1, 130, 143


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and appends ``(default: X)`` to options whose help does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == [] \
                or action.default == argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line naming the command and where help is."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Parser with every sub-command; only the requested one's module is imported."""
    parser = Parser(prog="bitpipe-fx", description="Pipeline-parallel training compiler for PyTorch.",
                    formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"bitpipe-fx {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_line) in COMMANDS.items():
        if name != wanted:
            sub.add_parser(name, help=help_line, description=f"{help_line}; see `bitpipe-fx {name} --help`")
            continue
        importlib.import_module(module).add_parser(sub, name, help_line).formatter_class = HelpFormatter
    return parser


def one_line(exc: BaseException) -> str:
    """An exception's message on one line: a launched rank's failure as its summary and the rank's own
    last traceback line (the full traceback is for --debug); any other multi-line message joined with '; '."""
    tracebacks, first = getattr(exc, "tracebacks", None), getattr(exc, "first_rank", None)
    if isinstance(tracebacks, dict) and first in tracebacks:
        last = next((t for t in reversed(tracebacks[first].strip().splitlines()) if t.strip()), "")
        return f"{str(exc).splitlines()[0]}: {last.strip()}"
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point: run one sub-command; errors become one line on stderr and an exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0") if "TORCHELASTIC_RUN_ID" in os.environ else "0"
    where = f"bitpipe-fx {args.command}" + (f" [rank {rank}]" if rank != "0" else "")  # torchrun: whose line
    try:
        return int(args.func(args) or 0)
    except Terminated:
        print(f"{where}: terminated (SIGTERM); every rank was stopped, what was already saved is kept",
              file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        gap = "\n" if sys.stderr.isatty() else ""  # past the ^C the terminal echoed
        print(f"{gap}{where}: interrupted (Ctrl-C); what was already saved is kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            traceback.print_exc()
        if isinstance(exc, BitPipeError) and not isinstance(exc, PipelineRuntimeError):
            print(f"{where}: error: {one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        hint = "" if debug else " (run with --debug for the traceback)"
        kind = "" if isinstance(exc, BitPipeError) else f"{type(exc).__name__}: "
        print(f"{where}: failed: {kind}{one_line(exc)}{hint}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
