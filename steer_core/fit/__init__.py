"""Calibration: the rank-1 fits that make a LoRA's A·x near-constant, so B adds the steering vector."""
