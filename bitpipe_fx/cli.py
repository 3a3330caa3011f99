"""The `bitpipe-fx` console script: a thin dispatcher over sub-command modules.

Each sub-command lives next to the layer it drives and exposes
``add_parser(subparsers)``, which registers its arguments and sets ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bitpipe_fx.errors import BitPipeError

# name -> module that implements it (imported lazily, so `simulate` never imports torch)
COMMANDS: dict[str, str] = {
    "simulate": "bitpipe_fx.sim.command",
    "inspect": "bitpipe_fx.passes.command",
    "partition": "bitpipe_fx.passes.command",
    "train": "bitpipe_fx.train",
    "demo": "bitpipe_fx.train",
    "export": "bitpipe_fx.train.export_command",
    "sample": "bitpipe_fx.train.sample",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Parser with every sub-command whose module exists; only the requested one is imported."""
    parser = argparse.ArgumentParser(prog="bitpipe-fx", description="Pipeline-parallel training compiler")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, module in COMMANDS.items():
        if name != wanted:
            sub.add_parser(name, help=f"(see `bitpipe-fx {name} --help`)")
            continue
        importlib.import_module(module).add_parser(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; a BitPipeError becomes one clear line on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.parse_args([args.command, "--help"])
    try:
        return int(args.func(args) or 0)
    except BitPipeError as exc:
        print(f"bitpipe-fx {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
