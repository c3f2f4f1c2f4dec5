"""Small probes of a UNet shared by the model tests."""

import torch

from rlfuse.lora import trainable_parameters


def unet_output(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    states = torch.randn(2, 16, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([500, 20]), encoder_hidden_states=states).sample


def perturb_lora(unet, seed=1):
    g = torch.Generator().manual_seed(seed)
    for name, p in trainable_parameters(unet).items():
        p.data += 0.05 * torch.randn(p.shape, generator=g)
