"""Quantization schemes and calibration."""
