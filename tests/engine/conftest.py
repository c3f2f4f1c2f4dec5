"""Shared pieces for the stage tests: a one-process accelerator and a LoRA policy on the tiny
pipeline with samples it drew, rewarded by JPEG size."""

import pytest
import torch

from rlfuse.families.sd import StableDiffusion
from rlfuse.families.tiny import build_tiny_pipeline
from rlfuse.lora import ReferencePolicy, add_lora, trainable_parameters
from rlfuse.policy import Policy

@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture
def tiny_policy():
    """(family, policy, optimizer): the tiny pipeline with fresh LoRA adapters (reference: adapters off)."""
    torch.manual_seed(0)
    family = StableDiffusion(build_tiny_pipeline(seed=0))
    for part in family.frozen:
        part.requires_grad_(False)
    add_lora(family.network, rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    policy = Policy(family.network, family, family.sampler(1.0), 5.0,
                    ReferencePolicy(family.network, "lora", torch.device("cpu")))
    optimizer = torch.optim.AdamW(trainable_parameters(family.network).values(), lr=1e-3)
    return family, policy, optimizer
