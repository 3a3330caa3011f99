"""`bitpipe-fx export RUN_DIR --out PATH`: a training run's weights as safetensors or a Hugging Face directory."""

from __future__ import annotations

import argparse

from bitpipe_fx.export import WEIGHTS


def add_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """Register `export`."""
    p = subparsers.add_parser(name, help=help, description=f"{help}.\n\n{__doc__}")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a `bitpipe-fx train` run")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="file to write (a folder for a Hugging Face model, loadable with from_pretrained)")
    p.add_argument("--weights", default="eval", choices=WEIGHTS,
                   help="Schedule-Free's averaged weights x (eval, the default) or the train weights y")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from bitpipe_fx.export import save
    from bitpipe_fx.train.restore import restore

    restored = restore(args.run_dir, args.weights)
    state = restored.model.state_dict()
    path = save(args.out, state, restored.model)
    print(f"wrote {path}: {len(state)} tensors of {type(restored.model).__name__} ({restored.config.dtype}), "
          f"{args.weights} weights at step {restored.step}")
    return 0
