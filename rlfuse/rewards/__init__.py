"""Rewards: images (B, 3, H, W) in [0, 1] and prompts in, a float tensor (B,) out."""
