"""LoRA adapters and the reference policy: adapters off on the same network, or a frozen copy."""

import torch

from rlfuse.families.tiny import build_tiny_pipeline
from rlfuse.lora import ReferencePolicy, add_lora, adapters_disabled, trainable_parameters
from helpers_models import perturb_lora, unet_output


def test_lora_starts_equal_to_base_and_reference_is_adapters_off():
    pipeline = build_tiny_pipeline(seed=0)
    base_out = unet_output(pipeline.unet)
    total_before = sum(p.numel() for p in pipeline.unet.parameters())
    add_lora(pipeline.unet, rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"])
    trainable = trainable_parameters(pipeline.unet)
    assert trainable and all("lora" in name for name in trainable)
    torch.testing.assert_close(unet_output(pipeline.unet), base_out)
    perturb_lora(pipeline.unet)
    assert not torch.allclose(unet_output(pipeline.unet), base_out)
    with adapters_disabled(pipeline.unet):
        torch.testing.assert_close(unet_output(pipeline.unet), base_out)
    # The reference policy costs only the adapters, never a second UNet.
    total_after = sum(p.numel() for p in pipeline.unet.parameters())
    assert total_after - total_before == sum(p.numel() for p in trainable.values()) < 0.5 * total_before


def test_reference_policy_with_lora_is_the_same_unet_with_adapters_off():
    pipeline = build_tiny_pipeline(seed=0)
    base_out = unet_output(pipeline.unet)
    add_lora(pipeline.unet, rank=4, alpha=4, target_modules=["to_q", "to_v", "conv1"])
    reference = ReferencePolicy(pipeline.unet, "lora", torch.device("cpu"))
    perturb_lora(pipeline.unet)
    with reference() as reference_unet:
        assert reference_unet is pipeline.unet  # no second network
        torch.testing.assert_close(unet_output(reference_unet), base_out)
        assert not torch.is_grad_enabled()
    assert not torch.allclose(unet_output(pipeline.unet), base_out), "adapters are back on afterwards"


def test_reference_policy_with_full_fine_tuning_is_a_frozen_copy():
    pipeline = build_tiny_pipeline(seed=0)
    base_out = unet_output(pipeline.unet)
    reference = ReferencePolicy(pipeline.unet, "full", torch.device("cpu"))
    with torch.no_grad():
        for p in pipeline.unet.parameters():
            p.add_(0.01)  # training moves the policy ...
    with reference() as reference_unet:
        assert reference_unet is not pipeline.unet
        torch.testing.assert_close(unet_output(reference_unet), base_out)  # ... not the reference
        assert not any(p.requires_grad for p in reference_unet.parameters())
