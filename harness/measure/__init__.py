"""Measurements: one timing protocol (train speed, sample speed, scaling), FID, NLL."""
