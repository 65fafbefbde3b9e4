"""Every RNG stream a training step draws from, as one picklable object (saved per rank in checkpoints)."""

import random

import numpy as np
import torch


def rng_states():
    from megaphi.parallel.random import get_rng_tracker

    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_rng_tracker().get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states):
    from megaphi.parallel.random import get_rng_tracker

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    get_rng_tracker().set_states(states["tracker"])
