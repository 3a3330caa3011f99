"""Runtime: local and torch.distributed executors, p2p, eager grad sync, launch.

``bitpipe_fx.runtime.launch(fn, nprocs)`` is the launcher function (its module also runs as
``python -m bitpipe_fx.runtime.launch``).
"""

from bitpipe_fx.runtime.launch import LaunchError, launch

__all__ = ["LaunchError", "launch"]
