"""`bitpipe-fx sample RUN_DIR --prompt TEXT --tokens N`: text from a byte-level causal LM training run.

The run's model is rebuilt with its checkpoint's evaluation weights (Schedule-Free's x); each new byte is
the argmax of the last position's logits (``--temperature 0``, the default) or drawn from
softmax(logits / T) with a seeded generator, the context being the last ``seq_len`` bytes.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from bitpipe_fx.errors import ConfigError


def _logits(out: object) -> torch.Tensor:
    """The logits of a model output: a tensor, a dict or a Hugging Face output with ``logits``."""
    if isinstance(out, torch.Tensor):
        return out
    return out["logits"] if isinstance(out, dict) else out.logits


@torch.no_grad()
def generate(model: nn.Module, prompt: list[int], tokens: int, context: int, temperature: float = 0.0,
             seed: int = 0) -> list[int]:
    """``prompt`` followed by ``tokens`` new token ids from a causal LM (eval mode; at most ``context`` ids in)."""
    if not prompt:
        raise ConfigError("the prompt is empty; pass --prompt with at least one character")
    if temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    device = next(model.parameters()).device
    for _ in range(tokens):
        window = torch.tensor([ids[-context:]], device=device)
        last = _logits(model(window))[0, -1].double().cpu()
        if temperature == 0:
            ids.append(int(last.argmax()))
        else:
            ids.append(int(torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=gen)))
    return ids


def add_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """Register `sample`."""
    p = subparsers.add_parser(name, help=help, description=f"{help}.\n\n{__doc__}")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a `bitpipe-fx train` run (task lm)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--tokens", type=int, default=200, help="bytes to generate (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default %(default)s)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from bitpipe_fx.train.restore import restore

    if args.tokens < 1:
        raise ConfigError(f"--tokens must be a positive integer, got {args.tokens}")
    restored = restore(args.run_dir)
    cfg = restored.config
    if cfg.task != "lm":
        raise ConfigError(f"{args.run_dir} trained task {cfg.task!r}; sample needs a causal LM run (task lm)")
    prompt = list(args.prompt.encode())
    vocab = _logits(restored.model(torch.tensor([prompt[:1]]))).shape[-1]
    if vocab > 256:
        raise ConfigError(f"the model's vocabulary has {vocab} entries; sample generates bytes, so it needs a "
                          "byte-level model (vocabulary <= 256)")
    if max(prompt, default=0) >= vocab:
        raise ConfigError(f"the prompt has byte {max(prompt)} but the model's vocabulary has {vocab} entries; "
                          "use text within it (ASCII for a 128-entry vocabulary)")
    ids = generate(restored.model, prompt, args.tokens, cfg.seq_len, args.temperature, args.seed)
    print(bytes(ids).decode("utf-8", errors="replace"))
    return 0
