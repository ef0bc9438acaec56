"""The random streams a training step may draw from (dropout, caption dropout, augmentation), as one
checkpointed component: saved with every checkpoint, restored on resume once the data stream has been
fast-forwarded (starting the loader draws a seed from torch's RNG, which must not shift the run)."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGStreams:
    """`state_dict` is the streams now; `load_state_dict` keeps a resumed state until `restore()`."""

    def __init__(self):
        self.pending: dict | None = None

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        self.pending = state

    def restore(self) -> None:
        """Apply a resumed state (once): call after the data stream is where the checkpoint left it."""
        if self.pending is not None:
            set_rng_state(self.pending)
            self.pending = None
