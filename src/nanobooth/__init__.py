"""nanobooth: DreamBooth fine-tuning for Stable Diffusion models."""

__version__ = "0.1.0"
