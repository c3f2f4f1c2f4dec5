"""The loop's stages and its machinery: processes and gathering, optimizing, evaluating, logging,
checkpointing, and setting models on the hardware. Plain arguments only: no config is read here."""
