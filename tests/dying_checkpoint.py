"""Run rlfuse.train with a checkpoint writer that dies half-way through one of its writes.

    python -m tests.dying_checkpoint <die at epoch> <overrides...>

The process SIGKILLs itself after writing half of that epoch's trainable.safetensors, as a power
cut or an OOM kill would, to test that an interrupted write never harms earlier checkpoints.
"""

import os
import signal
import sys

import rlfuse.engine.checkpoint as checkpoint
from rlfuse import train

die_at = int(sys.argv.pop(1))
real_save_file = checkpoint.save_file


def save_file_then_die(tensors: dict, filename) -> None:
    real_save_file(tensors, filename)
    if f"epoch_{die_at:06d}" in str(filename):
        with open(filename, "r+b") as handle:  # leave it half-written, then die
            handle.truncate(os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)


checkpoint.save_file = save_file_then_die
train.main()
