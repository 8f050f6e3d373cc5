"""Hierarchical Patch Diffusion Models: model, diffusion, pyramid geometry, trainer, sampling, CLI."""
