"""conf/hardware: what cannot run here stops at start-up in one line; the UNet switches keep its outputs."""

import copy

import pytest
import torch

from rlfuse.engine.hardware import check_hardware, configure_unet

OK = dict(strategy="ddp", mixed_precision="no", attention="sdpa", compile_unet=False, use_cpu=True, finetune="lora",
          zero_stage=2, fsdp_version=2)


@pytest.mark.parametrize("change, message", [
    ({"strategy": "horovod"}, "hardware.strategy='horovod': use one of ddp, deepspeed, fsdp"),
    ({"mixed_precision": "fp8"}, "use no, fp16 or bf16"),
    ({"attention": "flash3"}, "hardware.attention='flash3'"),
    ({"compile_unet": "yes"}, "hardware.compile='yes': use true or false"),
    ({"mixed_precision": "fp16"}, "fp16 needs a CUDA GPU"),
    ({"attention": "xformers"}, "xformers needs a CUDA GPU and the xformers package"),
    ({"strategy": "deepspeed"}, "hardware.strategy=deepspeed needs CUDA GPUs"),
    ({"strategy": "fsdp", "finetune": "full"}, "hardware.strategy=fsdp needs CUDA GPUs"),
])
def test_choices_that_cannot_run_on_this_cpu_are_refused_in_one_line(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        check_hardware(**{**OK, **change})
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("change, message", [
    ({"strategy": "deepspeed", "zero_stage": 3}, "zero_stage=3: use 1 or 2"),
    ({"strategy": "fsdp", "finetune": "full", "fsdp_version": 1}, "FSDP2 only"),
    ({"strategy": "fsdp", "finetune": "lora"}, "use hardware=multi_gpu"),
])
def test_engine_settings_rlfuse_cannot_sample_with_are_refused_where_a_gpu_exists(change, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())  # as if deepspeed were installed
    with pytest.raises(ValueError, match=message):
        check_hardware(**{**OK, "use_cpu": False, **change})
    check_hardware(**{**OK, "use_cpu": False, "strategy": change["strategy"], "finetune": "full"})  # the fixed one passes


def test_accelerate_plugins_follow_the_strategy():
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    from rlfuse.engine.hardware import accelerator_plugins

    assert accelerator_plugins("ddp", 2, False, 1.0, 2, True, False) == {}
    fsdp = accelerator_plugins("fsdp", 2, False, 1.0, 2, True, False)["fsdp_plugin"]
    assert isinstance(fsdp, FullyShardedDataParallelPlugin) and fsdp.fsdp_version == 2
    if __import__("importlib").util.find_spec("deepspeed") is not None:
        plugin = accelerator_plugins("deepspeed", 2, True, 1.0, 2, True, False)["deepspeed_plugin"]
        assert isinstance(plugin, DeepSpeedPlugin) and plugin.zero_stage == 2


def test_attention_backend_layout_and_checkpointing_keep_outputs_and_gradients(tiny_pipeline):
    base = tiny_pipeline.unet
    latents, timesteps, text = torch.randn(2, 4, 16, 16), torch.tensor([500, 100]), torch.randn(2, 8, 32)

    def output_and_gradient(unet):
        unet.train()
        out = unet(latents, timesteps, text).sample
        grad = torch.autograd.grad(out.square().mean(), unet.conv_in.weight)[0]
        return out.detach(), grad

    reference = output_and_gradient(copy.deepcopy(base))
    for attention, checkpointing, channels_last in [("eager", False, False), ("sdpa", True, True)]:
        unet = copy.deepcopy(base)
        configure_unet(unet, attention, checkpointing, False, channels_last)
        out, grad = output_and_gradient(unet)
        assert torch.allclose(out, reference[0], atol=1e-5), attention
        assert torch.allclose(grad, reference[1], rtol=1e-4, atol=1e-7), attention
        assert unet.is_gradient_checkpointing == checkpointing


def test_an_accelerate_launch_flag_against_the_strategy_is_refused(monkeypatch):
    from omegaconf import OmegaConf

    from rlfuse.cli import UserError, check_overrides
    from rlfuse.config import check_hardware_config

    hardware = check_overrides("train", ["hardware=cpu"]).hardware
    check_hardware_config(hardware, "lora")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="launched for fsdp but hardware.strategy=ddp: drop accelerate's --use_fsdp"):
        check_hardware_config(hardware, "lora")
    assert OmegaConf.select(hardware, "strategy") == "ddp"
