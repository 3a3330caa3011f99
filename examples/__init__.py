"""Example models and training script (installed as bitpipe_fx.examples)."""
