"""DPOK: policy optimisation with KL regularisation (Fan et al., NeurIPS 2023, arXiv 2305.16381).

Online policy gradient on the denoising chain, kept near the pretrained model by a KL penalty. The
KL between the fine-tuned and the pretrained chains is bounded by the sum of per-step KLs (the
paper's Lemma 4.2), and each step is a pair of Gaussians with the same std, so per step

    KL_t = || mu_theta(x_t) - mu_ref(x_t) ||^2 / (2 std_t^2)

Two forms of the penalty (`kl`):
    exact: KL_t above, averaged over the latent dimensions like the log-probabilities; it has the units
        of a KL and weights each step by how much its prediction moves the sample.
    noise: DPOK's own (google-research/google-research dpok/pipeline_stable_diffusion_extended.py,
        forward_calculate_logprob): || eps_theta - eps_ref ||^2 / dim, the squared difference of the two
        guided noise predictions (flow models: of the guided velocities).
For epsilon prediction mu_theta - mu_ref = c_t (eps_theta - eps_ref) with
c_t = sqrt(1 - a_prev - std_t^2) - sqrt(a_prev (1 - a_t) / a_t), so exact = r_t * noise with
r_t = c_t^2 / (2 std_t^2). For SD 1.5 at 50 DDIM steps and eta 1, r_t is 0.07-0.14 on 44 of the 50 steps
(median 0.088), 0.16-0.52 on five of the last six and 5.4 on the penultimate one: the same kl_weight is about
ten times weaker under exact than under noise, except near the end of the chain.

Per step, with the ratio to the sampling policy clamped as in DPOK's code (no gradient outside
[1 - eps, 1 + eps]):

    L = -reward_weight * A * clamp(p_theta / p_old, 1 - eps, 1 + eps) + kl_weight * KL_t

A is the reward minus a baseline: per-prompt statistics, the batch mean and std, none (the raw
reward, DPOK without a value function), or DPOK's learned value function V(x_t, t, c), trained
beside the policy with a squared error to the final reward. Defaults from DPOK's train_online_pg.py:
reward_weight 100, kl_weight 0.01, ratio clip 1e-4, value lr 1e-4.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from rlfuse.advantages import PerPromptStatTracker, normalize_batch
from rlfuse.dynamics.ddim import Transition, gaussian_log_prob
from rlfuse.policy import Policy
from rlfuse.replay_buffer import TransitionBuffer
from rlfuse.trajectories import Trajectories

BASELINES = ("per_prompt", "batch", "none", "value")
KL_FORMS = ("exact", "noise")


def gaussian_kl(policy: Transition, reference: Transition) -> torch.Tensor:
    """(B,) KL(N(mu_p, s^2 I) || N(mu_r, s^2 I)) per element, averaged over non-batch dimensions; the
    two transitions share their std. 0 where the step is deterministic (std 0)."""
    std = policy.std
    safe_std = torch.where(std == 0, torch.ones_like(std), std)
    kl = (policy.mean - reference.mean.detach()) ** 2 / (2 * safe_std**2)
    kl = torch.where(std == 0, torch.zeros_like(kl), kl)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def noise_kl(prediction: torch.Tensor, reference_prediction: torch.Tensor) -> torch.Tensor:
    """(B,) DPOK's penalty: mean over non-batch dimensions of (prediction - reference_prediction)^2, the
    two guided predictions (B, C, h, w); gradients through the policy's only."""
    difference = prediction.float() - reference_prediction.detach().float()
    return (difference**2).mean(dim=tuple(range(1, difference.ndim)))


def dpok_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    kl: torch.Tensor,
    reward_weight: float,
    kl_weight: float,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPOK loss of one denoising step of B trajectories.

    Args:
        log_probs: (B,) log p_theta with gradients; old_log_probs: (B,) at sampling time.
        advantages: (B,) reward minus baseline; kl: (B,) per-step KL to the reference, with gradients.
    Returns:
        loss and detached diagnostics: kl (mean per-step KL), policy_loss, ratio, clipfrac.
    """
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio.detach())  # diagnostics only
    # Clamped in log space: the same values, and no inf * 0 = NaN gradient when exp() would overflow.
    clamped = torch.exp(torch.clamp(log_ratio, math.log1p(-clip_range), math.log1p(clip_range)))
    policy_loss = -(reward_weight * advantages * clamped).mean()
    loss = policy_loss + kl_weight * kl.mean()
    stats = {
        "kl": kl.detach().mean(),
        "policy_loss": policy_loss.detach(),
        "ratio": ratio.detach().mean(),
        "clipfrac": ((ratio.detach() - 1).abs() > clip_range).float().mean(),
    }
    return loss, stats


class ValueNetwork(nn.Module):
    """V(x_t, t, c): the expected final reward from a state of the chain (DPOK's value function).

    Two strided convolutions over the latents, the prompt's mean text-encoder state and the
    timestep, each mapped to `width` features, then a small MLP. Input shapes: latents (B, C, H, W),
    timesteps (B,), prompt_embeds (B, L, D); output (B,).
    """

    def __init__(self, latent_channels: int, text_dim: int, width: int = 64):
        super().__init__()
        self.latents = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.text = nn.Linear(text_dim, width)
        self.time = nn.Linear(1, width)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(3 * width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        features = torch.cat([
            self.latents(latents.float()),
            self.text(prompt_embeds.float().mean(dim=1)),
            self.time(timesteps.float()[:, None] / 1000),
        ], dim=1)
        return self.head(features).squeeze(1)


class DPOK:
    """Advantages from rewards (or a learned value function), and the per-step DPOK loss.

    Args:
        reward_weight, kl_weight: weights of the policy-gradient term and of the per-step KL.
        kl: "exact" (the Gaussian KL of the step) or "noise" (DPOK's squared guided-prediction difference).
        clip_range: eps of the clamp on the ratio to the sampling policy.
        baseline: "per_prompt", "batch", "none" or "value" (a learned V(x_t, t, c)).
        buffer_size, min_count: per-prompt statistics (baseline=per_prompt), as in DDPO.
        value_learning_rate, value_width, value_seed: the value function's AdamW lr, width, and the
            seed of its initial weights (baseline=value).
        replay_buffer: DPOK's schedule, {capacity, updates_per_round, value_minibatches, value_batch_size}:
            keep the newest `capacity` transitions (0: off, train on-policy on the epoch's chains) and take
            `updates_per_round` optimizer steps per epoch on random single transitions from them
            (rlfuse.replay_buffer); with baseline=value, the value function takes one AdamW step per epoch
            on value_minibatches x value_batch_size random transitions, before the policy's steps.
    """

    needs_reference = True
    pairs = False
    single_update = False
    min_group_size = 1
    likelihood_free = False  # trains on the sampler's chains and log-probs

    def __init__(self, reward_weight: float = 100.0, kl_weight: float = 0.01, clip_range: float = 1e-4,
                 baseline: str = "per_prompt", buffer_size: int = 16, min_count: int = 16,
                 value_learning_rate: float = 1e-4, value_width: int = 64, value_seed: int = 0,
                 kl: str = "exact", replay_buffer: dict | None = None):
        if baseline not in BASELINES:
            raise ValueError(f"baseline={baseline!r}: use one of {', '.join(BASELINES)}")
        if kl not in KL_FORMS:
            raise ValueError(f"kl={kl!r}: use one of {', '.join(KL_FORMS)}")
        self.kl = kl
        self.reward_weight, self.kl_weight, self.clip_range = reward_weight, kl_weight, clip_range
        self.baseline = baseline
        self.stat_tracker = PerPromptStatTracker(buffer_size, min_count) if baseline == "per_prompt" else None
        self.value_learning_rate, self.value_width, self.value_seed = value_learning_rate, value_width, value_seed
        self.value: ValueNetwork | None = None  # built on the first minibatch, when its shapes are known
        self.value_optimizer: torch.optim.Optimizer | None = None
        self._pending_value_state: dict | None = None
        replay = {"capacity": 0, "updates_per_round": 5, "value_minibatches": 5, "value_batch_size": 256,
                  **(replay_buffer or {})}
        if replay["capacity"] < 0:
            raise ValueError(f"replay_buffer: capacity={replay['capacity']}: must be >= 0 (0: no buffer)")
        self.replay_buffer = TransitionBuffer(replay["capacity"], replay["updates_per_round"]) \
            if replay["capacity"] > 0 else None
        self.value_minibatches, self.value_batch_size = replay["value_minibatches"], replay["value_batch_size"]
        if self.value_minibatches < 1 or self.value_batch_size < 1:
            raise ValueError(f"replay_buffer: value_minibatches={self.value_minibatches}, value_batch_size="
                             f"{self.value_batch_size}: both must be >= 1")

    def advantages(self, prompts: list[str], rewards: torch.Tensor,
                   terms: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(B,) advantages for the all-process batch; with baseline=value, the raw rewards (the value
        is subtracted per step in the loss)."""
        if self.stat_tracker is not None:
            return self.stat_tracker.update(prompts, rewards), {}
        if self.baseline == "batch":
            return normalize_batch(rewards), {}
        return rewards.float(), {}

    def loss(self, policy: Policy, batch: Trajectories, step_index: torch.Tensor) -> tuple[torch.Tensor, dict]:
        rows = torch.arange(len(batch), device=step_index.device)
        prediction, transition = policy.predict_step(batch, step_index)
        reference_prediction, reference = policy.predict_step(batch, step_index, reference=True)
        kl = noise_kl(prediction, reference_prediction) if self.kl == "noise" else gaussian_kl(transition, reference)
        log_probs = gaussian_log_prob(batch.next_latents[rows, step_index], transition)  # (b,)
        old_log_probs = batch.log_probs[rows, step_index]
        advantages, value_stats = batch.advantages, {}
        if self.baseline == "value" and self.replay_buffer is not None:  # trained once per round (remember)
            with torch.no_grad():
                advantages = batch.advantages - self._values(batch, step_index)
        elif self.baseline == "value":
            values, value_stats = self._value_step(batch, step_index)
            advantages = batch.advantages - values
        loss, stats = dpok_loss(log_probs, old_log_probs, advantages, kl, self.reward_weight, self.kl_weight,
                                self.clip_range)
        return loss, {**stats, **value_stats}

    def remember(self, samples: Trajectories, steps: torch.Tensor, generator: torch.Generator) -> dict:
        """Replay schedule, once per round: add steps (T',) of the epoch's chains to the buffer, then (baseline
        =value) one value-function update on random transitions of the buffer. Returns its diagnostics."""
        self.replay_buffer.add(samples, steps)
        if self.baseline != "value":
            return {}
        parts = [self.replay_buffer.draw(self.value_batch_size, generator) for _ in range(self.value_minibatches)]
        return {"value_loss": self._value_update(parts)}

    def _values(self, batch: Trajectories, step_index: torch.Tensor) -> torch.Tensor:
        """(b,) V(x_t, t, c) at recorded step step_index (b,) of each chain, in fp32."""
        rows = torch.arange(len(batch), device=step_index.device)
        latents, timesteps = batch.latents[rows, step_index], batch.timesteps[rows, step_index]
        if self.value is None:
            self._build_value(latents.shape[1], batch.conditioning["prompt_embeds"].shape[-1], latents.device)
        with torch.autocast(device_type=latents.device.type, enabled=False):
            return self.value(latents, timesteps, batch.conditioning["prompt_embeds"])

    def _value_update(self, parts: list[tuple[Trajectories, torch.Tensor]]) -> torch.Tensor:
        """One AdamW step of V on the mean squared error to the final rewards over the minibatches `parts`
        (chains, step_index), their gradients accumulated and averaged over processes; the mean loss."""
        total = 0.0
        for batch, step_index in parts:
            value_loss = F.mse_loss(self._values(batch, step_index), batch.advantages.float()) / len(parts)
            value_loss.backward()
            total = total + value_loss.detach()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for parameter in self.value.parameters():
                torch.distributed.all_reduce(parameter.grad)
                parameter.grad /= world
        self.value_optimizer.step()
        self.value_optimizer.zero_grad()
        return total

    def _value_step(self, batch: Trajectories, step_index: torch.Tensor):
        """On-policy: predict V(x_t, t, c) for the minibatch (returned detached), and take one AdamW step
        on its squared error to the final rewards."""
        values = self._values(batch, step_index).detach()
        return values, {"value_loss": self._value_update([(batch, step_index)])}

    def _build_value(self, latent_channels: int, text_dim: int, device: torch.device) -> None:
        # Own seed: building the network must not move the global generator (exact resume).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.value_seed)
            self.value = ValueNetwork(latent_channels, text_dim, self.value_width).to(device)
        self.value_optimizer = torch.optim.AdamW(self.value.parameters(), lr=self.value_learning_rate)
        if self._pending_value_state is not None:
            self.value.load_state_dict(self._pending_value_state["weights"])
            self.value_optimizer.load_state_dict(self._pending_value_state["optimizer"])
            self._pending_value_state = None

    def state_dict(self) -> dict:
        value = None
        if self.value is not None:
            # Copies: the live tensors keep training after the state is taken.
            value = copy.deepcopy({"weights": self.value.state_dict(), "optimizer": self.value_optimizer.state_dict()})
        elif self._pending_value_state is not None:
            value = self._pending_value_state
        return {"stat_tracker": self.stat_tracker.state_dict() if self.stat_tracker else None, "value": value,
                "replay_buffer": self.replay_buffer.state_dict() if self.replay_buffer is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.stat_tracker is not None and state.get("stat_tracker") is not None:
            self.stat_tracker.load_state_dict(state["stat_tracker"])
        self._pending_value_state = state.get("value")
        self.value = self.value_optimizer = None
        if self.replay_buffer is not None and state.get("replay_buffer") is not None:
            self.replay_buffer.load_state_dict(state["replay_buffer"])

