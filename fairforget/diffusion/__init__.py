"""Bias-aware diffusion augmentation: the conditional generator, the planner, sample quality."""
