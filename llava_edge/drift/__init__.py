"""Drift metrics: how far a quantized file strays from the FP16 reference."""
