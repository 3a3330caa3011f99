"""Graph passes over torch.fx GraphModules: capture, cost, partition, split (bitpipe_fx.passes)."""
