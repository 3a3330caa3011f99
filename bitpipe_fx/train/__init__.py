"""`bitpipe-fx train` / `demo`: the main job, from checked settings to a pipelined training run and its pictures."""

from bitpipe_fx.train.command import DEMO, add_parser, main

__all__ = ["DEMO", "add_parser", "main"]
