"""The public sampler steps with log-probabilities, importable from one place.

    from rlfuse.sampling import ddim_step_with_logprob, flow_step_with_logprob

Each step lives in rlfuse/dynamics/ (one file per sampler); the rollout in rlfuse/rollout.py.
"""

from rlfuse.dynamics.ddim import (  # noqa: F401
    DDIMSampler,
    Transition,
    ddim_step_with_logprob,
    ddim_transition,
    gaussian_log_prob,
    step_stds,
)

from rlfuse.dynamics.flow import FlowSampler, flow_step_with_logprob, flow_transition  # noqa: F401

__all__ = ["DDIMSampler", "FlowSampler", "Transition", "ddim_step_with_logprob", "ddim_transition",
           "flow_step_with_logprob", "flow_transition", "gaussian_log_prob", "step_stds"]
