"""DiffusionNFT: online RL on the forward process (Zheng et al. 2025, arXiv 2509.16117).

No sampler log-probabilities and no chains: the policy samples clean images x_0 with any solver
(rlfuse: the deterministic Euler ODE, without guidance), the reward scores them, and training is
flow matching on those images, pulled towards the good ones and pushed from the bad ones.

The objective, worked out. Let v = eps - x_0 be the flow-matching target at x_t = (1 - t) x_0 + t eps,
v_theta the velocity of the trained policy and v_old that of the old policy that sampled (no
gradient). The paper splits the samples' distribution into a positive part pi+ (weight r) and a
negative part pi- (weight 1 - r) and defines two implicit policies, linear in v_theta:

    v+ = (1 - beta) v_old + beta v_theta           (implicit positive policy)
    v- = (1 + beta) v_old - beta v_theta           (implicit negative policy, the mirror of v+ about v_old)

Training v+ towards the samples weighted by r and v- towards them weighted by 1 - r,

    L(theta) = E_{c, x_0 ~ pi_old, t, eps} [ r ||v+ - v||^2 + (1 - r) ||v- - v||^2 ],

needs no likelihood, and its minimiser moves the policy from the bad samples towards the good ones.
At a point x_t let a = E[r | x_t], m+ = E[r v | x_t] / a and m- = E[(1 - r) v | x_t] / (1 - a) (the
velocity fields of the positive and negative parts), so that the old policy's own field is
v_old = a m+ + (1 - a) m-. With v+ = v_old + beta D and v- = v_old - beta D (D = v_theta - v_old),
setting the gradient of a ||v+ - m+||^2 + (1 - a) ||v- - m-||^2 to zero gives
beta D = a m+ - (1 - a) m- - (2a - 1) v_old = 2 a (1 - a) (m+ - m-), that is

    v_theta* = v_old + (2 / beta) a (1 - a) (m+ - m-)

(the paper's Theorem 3.2): a step of size 2 / beta along the direction from the negative samples'
velocity field to the positive ones', largest where good and bad samples mix (a near 1/2).

The optimality probability r in [0, 1] comes from the group-normalised reward, as the reference
code computes it (NVlabs/DiffusionNFT scripts/train_nft_sd3.py): A = (R - mean of the prompt's
group) / std (the group's, or the batch's with global_std), clipped to [-c, c] with c = adv_clip_max,
and r = A / (2c) + 1/2.

The reference code measures both errors in x_0 space with an adaptive weight: x+ = x_t - t v+ (the
clean image v+ predicts), error |x+ - x_0|^2 / w+ with w+ = mean |x+ - x_0| (detached, at least
1e-5, per sample); likewise for v-. Since x_t - x_0 = t v, x+ - x_0 = t (v - v+): the adaptive weight
normalises each sample's error by its own size (the paper's time weighting). Its total is

    L = c / beta * mean_i [ r_i e+_i + (1 - r_i) e-_i ]  +  kl_beta * mean_i ||v_theta - v_ref||^2 / dim

with v_ref the base model (LoRA switched off), kl_beta the reference code's train.beta (1e-4).
Each of these is reproduced here; the tests check the loss by hand.

The old policy is a second LoRA adapter ("old") on the same network, not a copy of it: it samples
the rollouts and gives v_old, and after each epoch moves towards the trained adapter,
old <- d old + (1 - d) theta, with d = min(decay_rate * updates, decay_max) over the run's optimizer
updates (the reference's decay_type 1: 0.001 per step up to 0.5; type 2: delay 75, 0.0075, 0.999).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

from rlfuse.algorithms.grpo import group_advantages, groups_without_signal
from rlfuse.errors import UserError
from rlfuse.lora import lora_layers
from rlfuse.policy import Policy
from rlfuse.trajectories import Trajectories

OLD_ADAPTER = "old"
TRAINED_ADAPTER = "default"  # diffusers' add_adapter name, which rlfuse.lora.add_lora uses
WEIGHT_FLOOR = 1e-5          # the adaptive weight's floor (reference code)


def optimality_probability(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """r = clip(A, -c, c) / (2c) + 1/2, in [0, 1]: 1/2 for an average sample of its group."""
    return torch.clamp(advantages, -adv_clip_max, adv_clip_max) / (2 * adv_clip_max) + 0.5


def adaptive_error(predicted_x0: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """(B,) mean over dims of |x^ - x_0|^2 / w, w = mean |x^ - x_0| per sample (detached, >= 1e-5)."""
    dims = tuple(range(1, x0.ndim))
    difference = predicted_x0.float() - x0.float()
    weight = difference.detach().abs().mean(dim=dims, keepdim=True).clamp(min=WEIGHT_FLOOR)
    return (difference**2 / weight).mean(dim=dims)


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
             r: torch.Tensor, beta: float, adv_clip_max: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy part of the DiffusionNFT loss for b samples.

    v_theta (b, C, h, w) with gradients; v_old (b, C, h, w) without; x_t the noised samples; x0 the
    clean ones; sigma (b,) the noise level t in [0, 1]; r (b,) the optimality probabilities.
    """
    t = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    v_old = v_old.detach()
    positive = beta * v_theta + (1 - beta) * v_old
    negative = (1 + beta) * v_old - beta * v_theta
    positive_error = adaptive_error(x_t - t * positive, x0)
    negative_error = adaptive_error(x_t - t * negative, x0)
    per_sample = r * positive_error + (1 - r) * negative_error
    loss = (per_sample / beta).mean() * adv_clip_max
    stats = {"positive_error": positive_error.detach().mean(), "negative_error": negative_error.detach().mean(),
             "old_deviation": ((v_theta.detach() - v_old) ** 2).mean(), "policy_loss": loss.detach()}
    return loss, stats


@contextlib.contextmanager
def active_adapter(layers: list[torch.nn.Module], name: str) -> Iterator[None]:
    """The LoRA layers compute with adapter `name` inside (only its weights require gradients), with the
    trained one again after. Switching the layers themselves (peft's BaseTunerLayer.set_adapter), not
    the whole network, keeps a switch cheap: it happens twice per training micro-step."""
    for layer in layers:
        layer.set_adapter(name)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_adapter(TRAINED_ADAPTER)


class NFT:
    """Group-normalised rewards as optimality probabilities, and the implicit positive / negative
    policies' flow-matching loss on the old policy's clean samples.

    Args:
        beta: how much of v_theta the implicit policies mix in; the optimum moves v_theta by 2 / beta times
            the improvement direction (reference: 1.0 for GenEval and PickScore, 0.1 for OCR).
        adv_clip_max: advantages are clipped to [-c, c] before r = A / 2c + 1/2 (reference: 5).
        kl_beta: weight of mean ||v_theta - v_ref||^2 to the base model (reference: 1e-4; 0 needs no reference).
        global_std: normalise by the std of the batch (true) or of each prompt's group.
        decay_rate, decay_max, decay_delay: the old policy's moving-average decay after u optimizer
            updates, d = min(max(u - delay, 0) * rate, max) (reference decay_type 1: 0.001, 0.5, 0).
    """

    pairs = False
    single_update = False   # no ratio to the sampling policy: several updates per round are fine
    min_group_size = 2      # r compares the images of a prompt
    likelihood_free = True  # clean samples from a deterministic solver; attach() makes the old policy

    def __init__(self, beta: float = 1.0, adv_clip_max: float = 5.0, kl_beta: float = 1e-4, global_std: bool = True,
                 decay_rate: float = 0.001, decay_max: float = 0.5, decay_delay: int = 0):
        if beta <= 0 or adv_clip_max <= 0 or kl_beta < 0 or decay_rate < 0 or not 0 <= decay_max < 1 \
                or decay_delay < 0:
            raise ValueError(f"beta={beta}, adv_clip_max={adv_clip_max}, kl_beta={kl_beta}, decay_rate={decay_rate}, "
                             f"decay_max={decay_max}, decay_delay={decay_delay}: need beta > 0, adv_clip_max > 0, "
                             f"kl_beta >= 0, decay_rate >= 0, 0 <= decay_max < 1, decay_delay >= 0")
        self.beta, self.adv_clip_max, self.kl_beta, self.global_std = beta, adv_clip_max, kl_beta, global_std
        self.decay_rate, self.decay_max, self.decay_delay = decay_rate, decay_max, decay_delay
        self.needs_reference = kl_beta > 0
        self.updates = 0
        self.network: torch.nn.Module | None = None

    # -- the old policy: a second LoRA adapter

    def attach(self, network: torch.nn.Module) -> None:
        """Add the old policy to the LoRA network, equal to the trained adapter (call before resuming)."""
        from peft import LoraConfig

        config = getattr(network, "peft_config", {}).get(TRAINED_ADAPTER)
        if not isinstance(config, LoraConfig):
            raise UserError("algorithm=nft keeps its old policy as a second LoRA adapter: set model.finetune=lora")
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: it is meant to be
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            network.add_adapter(config, adapter_name=OLD_ADAPTER)
        network.set_adapter(TRAINED_ADAPTER)
        self.network = network
        self.layers = lora_layers(network)
        self.update_old_policy(0.0)

    def _adapter_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(old, trained) parameter pairs of the two adapters, by name."""
        params = dict(self.network.named_parameters())
        marker, old_marker = f".{TRAINED_ADAPTER}.", f".{OLD_ADAPTER}."
        return [(params[name.replace(marker, old_marker)], p) for name, p in params.items() if marker in name]

    @torch.no_grad()
    def update_old_policy(self, decay: float) -> None:
        """old <- decay * old + (1 - decay) * trained."""
        for old, trained in self._adapter_pairs():
            old.mul_(decay).add_(trained.detach(), alpha=1 - decay)

    def decay(self) -> float:
        return min(max(self.updates - self.decay_delay, 0) * self.decay_rate, self.decay_max)

    def sampling(self) -> contextlib.AbstractContextManager:
        """The context in which rollouts sample: the old policy (its adapter active)."""
        return active_adapter(self.layers, OLD_ADAPTER)

    def end_epoch(self, updates: int) -> dict[str, float]:
        """After the epoch's `updates` optimizer updates: move the old policy towards the trained one."""
        self.updates += updates
        decay = self.decay()
        self.update_old_policy(decay)
        return {"old_policy_decay": decay}

    # -- advantages and loss

    def advantages(self, prompts: list[str], rewards: torch.Tensor,
                   terms: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(B,) group-normalised rewards (r is taken from them in the loss) and the share of groups
        whose images all scored the same (r = 1/2 for all: they teach nothing)."""
        advantages = group_advantages(prompts, rewards, self.global_std)
        return advantages, {"groups_without_signal": groups_without_signal(prompts, advantages)}

    def loss(self, policy: Policy, batch: Trajectories, step_index: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Noise each clean sample to the noise level of schedule step `step_index` (b,) with fresh noise
        (torch's global generator, seeded per process and saved in checkpoints), and the NFT loss."""
        rows = torch.arange(len(batch), device=step_index.device)
        x0 = batch.next_latents[:, -1]                                       # (b, C, h, w)
        timesteps = batch.timesteps[rows, step_index]                        # (b,) on the 0-1000 scale
        noise = torch.randn(x0.shape, dtype=x0.dtype).to(x0.device)
        x_t, _ = policy.sampler.forward_noising(x0, noise, timesteps)
        with torch.no_grad(), active_adapter(self.layers, OLD_ADAPTER):  # CFG-free: the conditional branch
            v_old = policy.predict(x_t, timesteps, batch.conditioning, guided=False)
        v_theta = policy.predict(x_t, timesteps, batch.conditioning, guided=False)
        r = optimality_probability(batch.advantages, self.adv_clip_max)
        loss, stats = nft_loss(v_theta, v_old, x_t, x0, timesteps.float() / 1000.0, r, self.beta, self.adv_clip_max)
        if self.kl_beta > 0:
            v_ref = policy.predict(x_t, timesteps, batch.conditioning, reference=True, guided=False)
            kl = ((v_theta.float() - v_ref.float()) ** 2).mean()
            loss = loss + self.kl_beta * kl
            stats["kl"] = kl.detach()
        return loss, stats

    def state_dict(self) -> dict:
        """The update count and the old adapter's weights (resuming restores the old policy exactly)."""
        return {"updates": self.updates, "old": [old.detach().cpu().clone() for old, _ in self._adapter_pairs()]}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        with torch.no_grad():
            for (old, _), saved in zip(self._adapter_pairs(), state["old"], strict=True):
                old.copy_(saved)
