"""Rewards: images (B, 3, H, W) in [0, 1] and B prompts in, a RewardOutput out (rlfuse.rewards.base):
scores (B,) float, plus {name: (B,)} terms of a combined reward and details for logging (often empty)."""
