"""Where an epoch's training batch comes from: one file per source, one protocol for the loop.

online: roll out the current policy, decode, reward (feedback=none).
replay: a labelled feedback dataset's stored chains, as preference pairs (feedback=human).
pairs: clean preference pairs, from parquet files, labelled datasets or reward ranking (feedback=pairs).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from rlfuse.trajectories import Trajectories


class EpochBatch(NamedTuple):
    """One process's share of an epoch's batch.

    samples: Trajectories of N rows (rewards filled in, advantages not yet);
    images: (n, 3, H, W) in [0, 1], the first images of the batch for the log's grid;
    details: {criterion: N floats} per-sample scores for logging (NaN where one does not apply).
    """

    samples: Trajectories
    images: torch.Tensor
    details: dict[str, list[float]]


class Source(Protocol):
    """pairs: the batch is made of pairs (rows 2i, 2i+1: one prompt, one initial noise), so an
    algorithm that trains on pairs can use it."""

    pairs: bool

    def epoch(self, epoch: int) -> EpochBatch: ...
