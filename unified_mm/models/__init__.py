"""Flax NNX modules (no training logic)."""
