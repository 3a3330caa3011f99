"""Runtime: local and torch.distributed executors, p2p, eager gradient sync, launch."""
