"""Triton kernels and their CPU reference paths (bitpipe_fx.kernels)."""
