"""RNG streams for tensor parallelism, and RNG-correct activation checkpointing.

Replicated regions (embedding/residual dropout: every TP rank holds the same values) draw from
the default torch generator, seeded identically on all TP ranks. TP-sharded regions (attention
probabilities: each rank holds different heads) draw from a per-TP-rank stream, entered with
`get_rng_tracker().fork()`. Both CPU and, when CUDA is initialized, CUDA generator states are
tracked, so the same code is exact on CPU tests and on GPUs.
"""

import contextlib

import torch
import torch.utils.checkpoint

from .state import get_tensor_model_parallel_rank

MODEL_PARALLEL_RNG = "model-parallel-rng"
TENSOR_PARALLEL_SEED_OFFSET = 2718


def _cuda_in_use():
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _get_device_states():
    states = {"cpu": torch.get_rng_state()}
    if _cuda_in_use():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_device_states(states):
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and _cuda_in_use():
        torch.cuda.set_rng_state(states["cuda"])


class RNGStatesTracker:
    """Named RNG streams; fork(name) runs a block on that stream and leaves the default untouched."""

    def __init__(self):
        self.states = {}
        self.seeds = set()

    def reset(self):
        self.states = {}
        self.seeds = set()

    def get_states(self):
        return {name: dict(s) for name, s in self.states.items()}

    def set_states(self, states):
        self.states = {name: dict(s) for name, s in states.items()}

    def add(self, name, seed):
        if name in self.states:
            raise ValueError(f"RNG state {name!r} already exists")
        if seed in self.seeds:
            raise ValueError(f"RNG seed {seed} is already used by another stream")
        self.seeds.add(seed)
        original = _get_device_states()
        torch.manual_seed(seed)
        self.states[name] = _get_device_states()
        _set_device_states(original)

    def ensure_default_stream(self):
        """Create the TP stream from the default seed if model_parallel_seed was never called."""
        if MODEL_PARALLEL_RNG not in self.states:
            base = torch.initial_seed() % (2**62)
            self.add(MODEL_PARALLEL_RNG, base + TENSOR_PARALLEL_SEED_OFFSET + get_tensor_model_parallel_rank())

    @contextlib.contextmanager
    def fork(self, name=MODEL_PARALLEL_RNG):
        if name == MODEL_PARALLEL_RNG:
            self.ensure_default_stream()
        if name not in self.states:
            raise KeyError(f"RNG state {name!r} was never added")
        original = _get_device_states()
        stream = self.states[name]
        if "cuda" not in stream and _cuda_in_use():
            # CUDA came up after the stream was made: derive its CUDA state from the CPU stream state.
            stream["cuda"] = _cuda_state_from(stream["cpu"])
        _set_device_states(stream)
        try:
            yield
        finally:
            self.states[name] = _get_device_states()
            _set_device_states(original)


def _cuda_state_from(cpu_state):
    original = _get_device_states()
    torch.set_rng_state(cpu_state)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    torch.cuda.manual_seed(seed)
    state = torch.cuda.get_rng_state()
    _set_device_states(original)
    return state


def rng_neutral():
    """Context manager for work that may draw random numbers but must not move any stream training
    draws from: start-up probes and anything only some ranks run (replicated regions need the same
    default-stream draws on every TP rank). Restores the CPU and the current CUDA device's generators."""
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if _cuda_in_use() else [])


_TRACKER = RNGStatesTracker()


def get_rng_tracker():
    return _TRACKER


get_cuda_rng_tracker = get_rng_tracker  # Megatron's name


def model_parallel_seed(seed):
    """Seed the default stream with `seed` (same on all TP ranks) and the TP stream with
    seed + 2718 + tp_rank (different per TP rank)."""
    torch.manual_seed(seed)
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, seed + TENSOR_PARALLEL_SEED_OFFSET + get_tensor_model_parallel_rank())


def checkpoint(function, *args):
    """Activation checkpointing that replays both the default RNG and the tracker's streams, so
    dropout masks on recompute equal those of the first forward."""
    tracker = get_rng_tracker()
    tracker.ensure_default_stream()
    saved = {}

    @contextlib.contextmanager
    def record_states():
        saved["states"] = tracker.get_states()
        yield

    @contextlib.contextmanager
    def replay_states():
        current = tracker.get_states()
        tracker.set_states(saved["states"])
        try:
            yield
        finally:
            tracker.set_states(current)

    return torch.utils.checkpoint.checkpoint(
        function,
        *args,
        use_reentrant=False,
        preserve_rng_state=True,
        context_fn=lambda: (record_states(), replay_states()),
    )
