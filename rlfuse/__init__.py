"""rlfuse: RL and preference fine-tuning of text-to-image diffusion models."""
