"""Diffusion-DPO: DPO on the denoising error of clean preference pairs (Wallace et al. 2023, arXiv 2311.12908).

No chains and no sampler log-probabilities: a pair is two clean images x_0^w (preferred) and x_0^l
of one prompt. Both are noised to the SAME timestep t with the SAME noise eps by the forward process,
and the network's error on each is compared with the reference model's (the paper's objective):

    err(x_0) = mean_CHW || f(x_t, t, c) - target ||^2     (per sample: target eps, v or the velocity)
    inside   = -beta / 2 * ( (err_theta(w) - err_theta(l)) - (err_ref(w) - err_ref(l)) )
    L        = -log sigmoid(inside)

Lowering the policy's error on the winner relative to the reference, or raising it on the loser,
raises `inside` and lowers L. The error is the denoising loss, whose negative is (up to constants
and a time weighting) a lower bound on log p(x_0): the paper derives L from DPO's implicit reward
r(x_0) = beta log p_theta(x_0) / p_ref(x_0) with that bound in place of the likelihood, so each
pair's `inside` is the implicit reward margin of winner over loser and the implicit accuracy is the
share of pairs where it is positive (the reference code's implicit_acc). With the policy equal to
the reference, inside = 0 and L = log 2; a tie carries no preference and gives nothing.

An optional term sft_weight * err_theta(w) adds the winner's own denoising loss, as RPO adds the
winner's negative log-likelihood to DPO (Pang et al. 2024, arXiv 2404.19733): DPO's margin can grow
while the winner's error grows too (likelihood displacement), and the term holds the winner's
likelihood up. Its gradient on err_theta(w) is sft_weight, against at most beta / 2 from the DPO term.
positive_lambda = l > 0 is DPO-Positive's remedy for the same (Pal et al. 2024, arXiv 2402.13228): inside
loses beta / 2 * l * max(0, err_theta(w) - err_ref(w)), so a winner denoised worse than the reference
denoises it costs the pair, and no margin is bought by degrading winner and loser together.

Targets follow the model: the sampler's forward_noising gives eps or v (the SD scheduler's
prediction_type, as the reference code's epsilon target and its v-prediction option) or the flow
velocity eps - x_0 (flow_grpo scripts/train_sd3_dpo.py). Timesteps: uniform on the 1000 training
steps for diffusion models (the reference code), logit-normal for flow models (Esser et al. 2024,
as flow_grpo draws them): each sampler's training_timesteps. The prediction is the conditional one,
without classifier-free guidance, as the paper trains.

The reference is the base model (with LoRA the network with its adapters off, with full fine-tuning
a frozen copy: rlfuse.lora.ReferencePolicy), or, with reference_every = N > 0, a second LoRA adapter
copied from the trained one every N epochs (flow_grpo's ref_update_step: online DPO).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from rlfuse.advantages import pair_preferences
from rlfuse.algorithms.nft import TRAINED_ADAPTER, active_adapter
from rlfuse.errors import UserError
from rlfuse.lora import lora_layers
from rlfuse.policy import Policy
from rlfuse.trajectories import Trajectories

REFERENCE_ADAPTER = "reference"


def denoising_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) mean over C, h, w of the squared error, in fp32."""
    return ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))


def dpo_loss(policy_errors: torch.Tensor, reference_errors: torch.Tensor, preferences: torch.Tensor,
             beta: float, sft_weight: float = 0.0, positive_lambda: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Diffusion-DPO loss of P pairs.

    policy_errors, reference_errors: (2P,) denoising errors, rows 2i and 2i + 1 one pair (same t, same
    noise); preferences: (2P,) +1 for the preferred image of a pair, -1 for the other, 0 for both of a
    tie. Returns the mean over the decided pairs (0 if none) of -log sigmoid(inside) + sft_weight *
    err_theta(winner), and diagnostics: implicit_accuracy (share of decided pairs with inside > 0), the
    winner's and loser's errors. positive_lambda > 0 subtracts beta / 2 * positive_lambda * max(0,
    err_theta(w) - err_ref(w)) from inside (DPO-Positive).
    """
    first_wins = preferences[0::2]                                              # (P,) +1, -1 or 0
    decided = first_wins != 0
    # (P,) winner minus loser: flip the pair's difference where its second image won.
    policy_margin = (policy_errors[0::2] - policy_errors[1::2]) * first_wins
    reference_margin = (reference_errors[0::2] - reference_errors[1::2]).detach() * first_wins
    winner_errors = torch.where(first_wins > 0, policy_errors[0::2], policy_errors[1::2])     # (P,)
    winner_reference = torch.where(first_wins > 0, reference_errors[0::2], reference_errors[1::2]).detach()
    penalty = positive_lambda * torch.relu(winner_errors - winner_reference)   # the winner's error above the reference's
    implicit = -0.5 * beta * (policy_margin - reference_margin)                 # (P,) the implicit reward margin
    inside = implicit - 0.5 * beta * penalty
    losses = -F.logsigmoid(inside) + sft_weight * winner_errors
    count = decided.sum().clamp(min=1)
    loss = torch.where(decided, losses, 0.0).sum() / count
    winner = winner_errors.detach()
    loser = torch.where(first_wins > 0, policy_errors[1::2], policy_errors[0::2]).detach()
    stats = {"implicit_accuracy": ((implicit.detach() > 0) & decided).sum() / count,
             "reward_margin": torch.where(decided, implicit.detach(), 0.0).sum() / count,
             "error_winner": (winner * decided).sum() / count, "error_loser": (loser * decided).sum() / count}
    return loss, stats


class DiffusionDPO:
    """Preference pairs of clean images (feedback=pairs) as the Diffusion-DPO loss.

    Args:
        beta: the DPO temperature on the denoising-error margin (paper and reference code: 5000 for
            SD 1.5 and SDXL; for flow models see conf/algorithm/diffusion_dpo.yaml).
        timesteps_per_pair: noise draws (t, eps) per pair per pass; one micro-step each.
        reference_every: 0: the reference is the base model; N > 0: a second LoRA adapter that takes the
            trained adapter's weights every N epochs (online DPO).
        sft_weight: weight of the winner's denoising error added to each pair's loss (0: the paper's loss).
        positive_lambda: DPO-Positive's weight on the winner's error above the reference's (0: the paper's loss).
    """

    pairs = True            # rows 2i, 2i + 1: winner and loser of one prompt, kept together in minibatches
    clean_pairs = True      # trains on clean images of preference pairs (feedback=pairs), not on chains
    single_update = False   # no ratio to a sampling policy: several updates per round are fine
    min_group_size = 1      # the pairs come from the source, not from images sampled per prompt
    likelihood_free = False  # does not sample its own clean images (the pairs source does)

    def __init__(self, beta: float = 5000.0, timesteps_per_pair: int = 1, reference_every: int = 0,
                 sft_weight: float = 0.0, positive_lambda: float = 0.0):
        if beta <= 0 or timesteps_per_pair < 1 or reference_every < 0 or sft_weight < 0 or positive_lambda < 0:
            raise ValueError(f"beta={beta}, timesteps_per_pair={timesteps_per_pair}, reference_every="
                             f"{reference_every}, sft_weight={sft_weight}, positive_lambda={positive_lambda}: need "
                             f"beta > 0, timesteps_per_pair >= 1 and reference_every, sft_weight, positive_lambda >= 0")
        self.beta, self.timesteps_per_pair, self.reference_every = beta, timesteps_per_pair, reference_every
        self.sft_weight, self.positive_lambda = sft_weight, positive_lambda
        self.needs_reference = reference_every == 0   # the base model, through rlfuse.lora.ReferencePolicy
        self.epochs = 0
        self.network: torch.nn.Module | None = None

    # -- a moving reference: a second LoRA adapter (reference_every > 0)

    def attach(self, network: torch.nn.Module) -> None:
        """With reference_every > 0: add the reference adapter, equal to the trained one (before resuming)."""
        if self.reference_every == 0:
            return
        from peft import LoraConfig

        config = getattr(network, "peft_config", {}).get(TRAINED_ADAPTER)
        if not isinstance(config, LoraConfig):
            raise UserError("algorithm.objective.reference_every > 0 keeps the reference as a second LoRA adapter: "
                            "set model.finetune=lora, or algorithm.objective.reference_every=0")
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: it is meant to be
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            network.add_adapter(config, adapter_name=REFERENCE_ADAPTER)
        network.set_adapter(TRAINED_ADAPTER)
        self.network, self.layers = network, lora_layers(network)
        self.refresh_reference()

    def _adapter_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(reference, trained) parameter pairs of the two adapters, by name."""
        params = dict(self.network.named_parameters())
        marker, reference_marker = f".{TRAINED_ADAPTER}.", f".{REFERENCE_ADAPTER}."
        return [(params[name.replace(marker, reference_marker)], p) for name, p in params.items() if marker in name]

    @torch.no_grad()
    def refresh_reference(self) -> None:
        for reference, trained in self._adapter_pairs():
            reference.copy_(trained.detach())

    def end_epoch(self, updates: int) -> dict[str, float]:
        """After each optimize stage: with reference_every = N, the reference takes the trained weights
        every N epochs."""
        self.epochs += 1
        if self.reference_every == 0:
            return {}
        refreshed = self.epochs % self.reference_every == 0
        if refreshed:
            self.refresh_reference()
        return {"reference_refreshed": float(refreshed)}

    # -- preferences and loss

    def advantages(self, prompts: list[str], rewards: torch.Tensor,
                   terms: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(B,) preference signs of the pairs (rows 2i, 2i + 1; +1 the preferred, 0 a tie) from their
        rewards (the source gives 1 and 0, or the reward's scores); diagnostic: the share decided."""
        if any(prompts[i] != prompts[i + 1] for i in range(0, len(prompts) - 1, 2)):
            raise ValueError("Diffusion-DPO pairs must share their prompt")
        preferences = pair_preferences(rewards)
        return preferences, {"pairs_decided": float((preferences[0::2] != 0).float().mean())}

    def loss(self, policy: Policy, batch: Trajectories, step_index: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Noise each pair's two clean latents (b, C, h, w) to one drawn timestep with one drawn noise
        (torch's global generator: seeded per process and saved in checkpoints) and the DPO loss;
        step_index only counts the draws."""
        x0 = batch.next_latents[:, -1]                                            # (b, C, h, w), b = 2P
        pairs = len(batch) // 2
        timesteps = policy.sampler.training_timesteps(pairs).to(x0.device).repeat_interleave(2)       # (b,)
        noise = torch.randn((pairs, *x0.shape[1:]), dtype=x0.dtype).to(x0.device).repeat_interleave(2, dim=0)
        noisy, target = policy.sampler.forward_noising(x0, noise, timesteps)
        prediction = policy.predict(noisy, timesteps, batch.conditioning, guided=False)  # conditional, no CFG
        policy_errors = denoising_error(prediction, target)
        with torch.no_grad():
            if self.reference_every > 0:
                with active_adapter(self.layers, REFERENCE_ADAPTER):
                    reference_prediction = policy.predict(noisy, timesteps, batch.conditioning, guided=False)
            else:
                reference_prediction = policy.predict(noisy, timesteps, batch.conditioning, reference=True,
                                                      guided=False)
        reference_errors = denoising_error(reference_prediction, target)
        return dpo_loss(policy_errors, reference_errors, batch.advantages, self.beta, self.sft_weight,
                        self.positive_lambda)

    def state_dict(self) -> dict:
        """The epoch count and, with a moving reference, its adapter's weights (resume restores it exactly)."""
        state = {"epochs": self.epochs}
        if self.reference_every > 0:
            state["reference"] = [reference.detach().cpu().clone() for reference, _ in self._adapter_pairs()]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epochs = state["epochs"]
        if self.reference_every > 0:
            with torch.no_grad():
                for (reference, _), saved in zip(self._adapter_pairs(), state["reference"], strict=True):
                    reference.copy_(saved)
