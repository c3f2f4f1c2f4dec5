"""RWR: reward-weighted regression, the baseline of the DDPO paper (Black et al. 2023, arXiv 2305.13301,
section 4.1; Peters & Schaal 2007).

RWR maximises E[log p_theta(x_0 | c) * w(r)] over the model's own samples, with the log-likelihood
replaced by the usual diffusion training loss: noise the sample x_0 to a timestep t, predict the
noise, weight the squared error by the sample's weight:

    L = (1/N) sum_i w_i * || eps_theta(sqrt(a_t) x0_i + sqrt(1 - a_t) eps, t, c_i) - eps ||^2 / dim

eps_theta is the guided prediction the sampler used, eps_u + s (eps_c - eps_u) at the sampling guidance
scale s (prediction="guided", the default): the function that drew the samples is the one trained, as
DDPO's code trains every method through the guided prediction (kvablack/ddpo-pytorch config/base.py,
train.cfg). prediction="conditional" regresses the conditional branch alone, the pretraining loss
(supervised fine-tuning on weighted samples), in one forward pass instead of two.

Weights (DDPO, section 4.1):
    weighted: w = softmax(r / beta) * N, so that the weights average to 1 over the N samples (or,
        per prompt, over each prompt's group of images). With normalize (the default) r is first
        standardised over the same samples, so that beta does not depend on the reward's units
        (JPEG kB and a [0, 1] score need the same beta);
    sparse:   w = 1 for samples whose reward is at least the `quantile` quantile, else 0 (plain
        supervised fine-tuning on the best samples; DDPO's RWR_sparse).
The effective sample size (sum w)^2 / sum w^2 says how many samples the weights really use.
"""

from __future__ import annotations

import torch

from rlfuse.advantages import normalize_batch
from rlfuse.policy import Policy
from rlfuse.trajectories import Trajectories

WEIGHTINGS = ("weighted", "sparse")
PREDICTIONS = ("guided", "conditional")


def rwr_weights(
    rewards: torch.Tensor, groups: list[str] | None, temperature: float, weighting: str, quantile: float,
    normalize: bool = True,
) -> torch.Tensor:
    """(N,) weights of N samples with rewards (N,); groups: a key per sample to weight within (the
    prompts), or None to weight over the whole batch; normalize: standardise rewards within each
    group before the softmax (weighted only)."""
    rewards = rewards.double()
    weights = torch.empty_like(rewards)
    keys = groups if groups is not None else [""] * len(rewards)
    for key in sorted(set(keys)):
        mask = torch.tensor([k == key for k in keys])
        group = rewards[mask]
        if weighting == "weighted":
            if normalize:
                group = normalize_batch(group).double()
            weights[mask] = torch.softmax(group / temperature, dim=0) * len(group)
        else:
            weights[mask] = (group >= torch.quantile(group, quantile)).double()
    return weights.float()


def effective_sample_size(weights: torch.Tensor) -> float:
    """(sum w)^2 / sum w^2: N for equal weights, 1 when one sample carries all the weight."""
    weights = weights.double()
    total = (weights**2).sum()
    return float(weights.sum() ** 2 / total) if total > 0 else 0.0


def weighted_denoising_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """mean_i w_i * mean over dims of (prediction_i - target_i)^2.

    prediction, target: (b, C, H, W); weights: (b,). Diagnostic: denoising_mse, the unweighted error.
    """
    errors = ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))  # (b,)
    return (weights * errors).mean(), {"denoising_mse": errors.detach().mean()}


class RWR:
    """Reward weights, and the weighted denoising loss on the model's own final samples.

    Args:
        temperature: beta of softmax(r / beta); smaller concentrates the weight on the best samples.
        per_prompt: weight within each prompt's group of images instead of over the whole batch.
        weighting: "weighted" (softmax weights) or "sparse" (the top quantile, unweighted).
        quantile: the reward quantile above which sparse weighting keeps samples.
        normalize: standardise rewards before the softmax (weighted), so temperature is unit-free.
        prediction: "guided" (the prediction sampling used, at its guidance scale) or "conditional" (the
            conditional branch alone).
    """

    needs_reference = False
    pairs = False
    single_update = False
    min_group_size = 1
    likelihood_free = False  # samples with the stochastic sampler, as the others (its loss reads only x_0)

    def __init__(self, temperature: float = 0.5, per_prompt: bool = False, weighting: str = "weighted",
                 quantile: float = 0.9, normalize: bool = True, prediction: str = "guided"):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r}: use one of {', '.join(WEIGHTINGS)}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r}: use one of {', '.join(PREDICTIONS)}")
        if temperature <= 0 or not 0 <= quantile < 1:
            raise ValueError(f"temperature={temperature}, quantile={quantile}: need temperature > 0, 0 <= quantile < 1")
        self.temperature, self.per_prompt, self.weighting, self.quantile = temperature, per_prompt, weighting, quantile
        self.normalize, self.prediction = normalize, prediction

    def advantages(self, prompts: list[str], rewards: torch.Tensor,
                   terms: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(B,) weights for the all-process batch, and their effective sample size."""
        weights = rwr_weights(rewards, prompts if self.per_prompt else None, self.temperature, self.weighting,
                              self.quantile, self.normalize)
        return weights, {"weight_ess": effective_sample_size(weights)}

    def loss(self, policy: Policy, batch: Trajectories, step_index: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Noise each final sample x_0 to the timestep of recorded step `step_index` with fresh noise
        (torch's global generator, seeded per process and saved in checkpoints) and regress the prediction
        (guided as sampling guides it, or the conditional branch) on its target."""
        rows = torch.arange(len(batch), device=step_index.device)
        samples = batch.next_latents[:, -1]                                  # (b, C, H, W) x_0
        timesteps = batch.timesteps[rows, step_index]                        # (b,)
        noise = torch.randn(samples.shape, dtype=samples.dtype).to(samples.device)
        prediction, target = policy.denoise(samples, noise, timesteps, batch.conditioning,
                                            guided=self.prediction == "guided")
        return weighted_denoising_loss(prediction, target, batch.advantages)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
