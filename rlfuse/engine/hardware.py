"""How a run uses its hardware: the accelerate engine (DDP, DeepSpeed ZeRO, FSDP), precision, TF32,
the attention backend and torch.compile, from the plain values of conf/hardware/.

`check_hardware` runs in the preflight, before any folder is made, so a run that cannot work on
this machine stops with one line; `accelerator_plugins` and `configure_unet` apply the choices.
"""

from __future__ import annotations

import importlib.util

import torch

STRATEGIES = ("ddp", "deepspeed", "fsdp")
ATTENTION = ("sdpa", "eager", "xformers")


def check_hardware(strategy: str, mixed_precision: str, attention: str, compile_unet: bool, use_cpu: bool,
                   finetune: str, zero_stage: int, fsdp_version: int) -> None:
    """Raise ValueError (one line: the problem and the fix) if these choices cannot run here."""
    if strategy not in STRATEGIES:
        raise ValueError(f"hardware.strategy={strategy!r}: use one of {', '.join(STRATEGIES)}")
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"hardware.mixed_precision={mixed_precision!r}: use no, fp16 or bf16")
    if attention not in ATTENTION:
        raise ValueError(f"hardware.attention={attention!r}: use one of {', '.join(ATTENTION)}")
    if not isinstance(compile_unet, bool):
        raise ValueError(f"hardware.compile={compile_unet!r}: use true or false")
    has_gpu = torch.cuda.is_available() and not use_cpu
    if mixed_precision == "fp16" and not has_gpu:
        raise ValueError("hardware.mixed_precision=fp16 needs a CUDA GPU (fp16 autocast on a CPU is not supported); "
                         "use bf16 or no, or hardware=gpu on a GPU machine")
    if attention == "xformers" and (not has_gpu or importlib.util.find_spec("xformers") is None):
        raise ValueError("hardware.attention=xformers needs a CUDA GPU and the xformers package "
                         "(pip install xformers); or use hardware.attention=sdpa")
    if strategy == "ddp":
        return
    # accelerate turns DeepSpeed and FSDP on only for GPU process groups (on CPUs it falls back to
    # plain data parallel), so asking for them without a GPU would silently run something else.
    if not has_gpu:
        raise ValueError(f"hardware.strategy={strategy} needs CUDA GPUs (accelerate runs DeepSpeed and FSDP on GPUs "
                         f"only); use hardware=cpu or hardware=multi_gpu here")
    if strategy == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError("hardware.strategy=deepspeed needs the deepspeed package: pip install deepspeed")
        if zero_stage not in (1, 2):
            # ZeRO-3 shards the parameters, while the sampler runs the UNet outside the engine.
            raise ValueError(f"hardware.deepspeed.zero_stage={zero_stage}: use 1 or 2 (ZeRO-3 shards the weights the "
                             f"sampler reads whole; for sharded weights use hardware=fsdp)")
    if strategy == "fsdp":
        if fsdp_version != 2:
            # FSDP2 shards the module in place, so the sampler's plain forward calls gather the weights;
            # FSDP1 would need every call to go through its wrapper.
            raise ValueError(f"hardware.fsdp.version={fsdp_version}: rlfuse supports FSDP2 only; set it to 2")
        if finetune != "full":
            raise ValueError("hardware.strategy=fsdp shards full fine-tuning; with model.finetune=lora the trained "
                             "weights are small: use hardware=multi_gpu (DDP)")


def accelerator_plugins(strategy: str, zero_stage: int, offload_optimizer: bool, gradient_clipping: float,
                        fsdp_version: int, reshard_after_forward: bool, cpu_offload: bool) -> dict:
    """Keyword arguments for accelerate.Accelerator that select DeepSpeed or FSDP (none for DDP)."""
    if strategy == "deepspeed":
        from accelerate.utils import DeepSpeedPlugin

        return {"deepspeed_plugin": DeepSpeedPlugin(
            zero_stage=zero_stage, offload_optimizer_device="cpu" if offload_optimizer else "none",
            gradient_clipping=gradient_clipping)}
    if strategy == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        return {"fsdp_plugin": FullyShardedDataParallelPlugin(
            fsdp_version=fsdp_version, reshard_after_forward=reshard_after_forward, cpu_offload=cpu_offload,
            state_dict_type="FULL_STATE_DICT")}
    return {}


def configure_unet(unet: torch.nn.Module, attention: str, gradient_checkpointing: bool, compile_unet: bool,
                   channels_last: bool) -> None:
    """Set the UNet's attention backend, memory layout, checkpointing and compilation, in place."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if attention == "sdpa":
        if isinstance(unet, UNet2DConditionModel):      # transformers' own processors already use SDPA
            unet.set_attn_processor(AttnProcessor2_0())  # torch's scaled_dot_product_attention
    elif attention == "eager":
        unet.set_attn_processor(AttnProcessor())         # plain matmul + softmax
    else:
        unet.enable_xformers_memory_efficient_attention()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if compile_unet:
        unet.compile()                                   # in place: sampling and training both use it


# ----------------------------------------------------------------------------- models on the hardware


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen parts (and of a LoRA's base weights) under mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def place_models(family, finetune: str, lora_rank: int, lora_alpha: float, lora_targets: list[str],
                 mixed_precision: str, device: torch.device, attention: str, gradient_checkpointing: bool,
                 compile_network: bool, channels_last: bool) -> torch.nn.Module:
    """Move the family's parts to the device and make its network trainable; returns the network.

    Frozen parts run in the mixed-precision dtype; trainable weights stay in fp32 (as DDPO's code).
    With LoRA the base weights are cast too and only the adapters train.
    """
    from rlfuse.lora import add_lora, trainable_parameters

    dtype = weight_dtype(mixed_precision)
    cast = {"device": device} if dtype == torch.float32 else {"device": device, "dtype": dtype}
    for part in family.frozen:
        part.requires_grad_(False).to(**cast)
    network = family.network
    if finetune == "lora":
        network.to(**cast)
        add_lora(network, lora_rank, lora_alpha, lora_targets)
        for p in trainable_parameters(network).values():
            p.data = p.data.float()
    else:
        network.to(device).requires_grad_(True)
    configure_unet(network, attention, gradient_checkpointing, compile_network, channels_last)
    return network


def make_accelerator(cpu: bool, mixed_precision: str, micro_steps_per_update: int, strategy: str, zero_stage: int,
                     offload_optimizer: bool, max_grad_norm: float, fsdp_version: int, reshard_after_forward: bool,
                     fsdp_cpu_offload: bool, allow_tf32: bool):
    """The accelerate engine: one optimizer step per micro_steps_per_update backward passes."""
    from accelerate import Accelerator

    accelerator = Accelerator(
        cpu=cpu, mixed_precision=mixed_precision, gradient_accumulation_steps=micro_steps_per_update,
        **accelerator_plugins(strategy, zero_stage, offload_optimizer, max_grad_norm, fsdp_version,
                              reshard_after_forward, fsdp_cpu_offload),
    )
    if allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator
