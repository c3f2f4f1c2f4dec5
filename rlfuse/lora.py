"""Make a network trainable (peft LoRA adapters, or every weight) and give its reference policy:
the same network with adapters off, or a frozen copy for full fine-tuning."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from rlfuse.errors import UserError


def add_lora(network: torch.nn.Module, rank: int, alpha: float, target_modules: list[str]) -> None:
    """Freeze the network and add trainable LoRA adapters (Hu et al. 2021) through peft.

    The up-projection starts at zero, so the adapted network starts equal to the base one.
    """
    from peft import LoraConfig

    network.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    try:
        network.add_adapter(config)
    except ValueError as error:
        raise UserError(f"model.lora.target_modules={list(target_modules)}: {error}") from None


def trainable_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def lora_layers(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The network's peft LoRA layers (BaseTunerLayer modules)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in network.modules() if isinstance(module, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(network: torch.nn.Module) -> Iterator[None]:
    """The reference policy with LoRA: the same network with its adapters switched off. The layers are
    switched themselves (peft's BaseTunerLayer.enable_adapters), as diffusers' disable_adapters does
    after version checks that cost more than a small network's forward pass."""
    layers = lora_layers(network)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class ReferencePolicy:
    """The base model that D3PO and DPOK compare the policy with, as a context yielding a network.

    With LoRA it is the policy's own network with its adapters switched off: no second network in
    memory (torchtune's LoRA DPO recipe does the same). With full fine-tuning it is a frozen copy of
    the network taken when this is built (before training or loading a checkpoint), optionally kept on
    the CPU and streamed to the device layer by layer by accelerate's cpu_offload (slower, no device memory).

    Call it inside the loop: `with reference() as network: network(...)`; it runs under no_grad.
    """

    def __init__(self, network: torch.nn.Module, finetune: str, device: torch.device, offload: bool = False):
        self.shares_weights = finetune == "lora"
        if self.shares_weights:
            self.network = network
            return
        frozen = type(network).from_config(network.config)
        frozen.load_state_dict(network.state_dict())
        frozen.requires_grad_(False).eval()
        frozen.to(dtype=next(network.parameters()).dtype)
        if offload and device.type != "cpu":
            from accelerate import cpu_offload

            cpu_offload(frozen, execution_device=device)
        else:
            frozen.to(device)
        self.network = frozen

    @contextlib.contextmanager
    def __call__(self) -> Iterator[torch.nn.Module]:
        with torch.no_grad(), (adapters_disabled(self.network) if self.shares_weights else contextlib.nullcontext()):
            yield self.network
