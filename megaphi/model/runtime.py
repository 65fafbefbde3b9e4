"""How a built model runs, apart from what it is: recompute, loss chunking, attention kernel,
sequence parallel and compiled blocks.

PhiConfig (megaphi.config) is the architecture: it is what a model folder's config.json holds. A
ModelRuntime is a choice of the run that uses the model; it is never written to a model folder, and
every default means "plain" (no recompute, full logits, the automatic attention kernel, no sequence
parallel, eager blocks), which is how a model loaded for evaluation or generation runs. Give it at
build time, `PhiForCausalLM(config, runtime=ModelRuntime(...))`, or afterwards with
`apply_runtime(model, runtime)`. None of these choices changes the function the model computes; they
trade memory, speed and communication.
"""

import dataclasses
from dataclasses import dataclass

from .attention import ATTENTION_BACKENDS

RECOMPUTE_CHOICES = ("none", "selective", "full")


@dataclass(frozen=True)
class ModelRuntime:
    recompute: str = "none"  # none | selective (core attention only) | full (whole layers)
    recompute_num_layers: int = 0  # full recompute: the first N layers only (0 = all)
    loss_chunk_tokens: int = 0  # > 0: lm_head + cross entropy N tokens at a time (no full logits)
    attention_backend: str = "auto"  # auto (flash-attn when usable, else SDPA's choice) or one kernel forced
    sequence_parallel: bool = False  # Megatron sequence parallel in training forwards (acts when TP > 1)
    compile: bool = False  # torch.compile each decoder block (megaphi.model.compile)

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f"ModelRuntime: {msg}")

        need(
            self.recompute in RECOMPUTE_CHOICES,
            f"recompute must be one of {', '.join(RECOMPUTE_CHOICES)}, got {self.recompute!r}",
        )
        need(
            _is_count(self.recompute_num_layers),
            f"recompute_num_layers must be an int >= 0, got {self.recompute_num_layers!r}",
        )
        need(
            _is_count(self.loss_chunk_tokens), f"loss_chunk_tokens must be an int >= 0, got {self.loss_chunk_tokens!r}"
        )
        need(
            self.attention_backend in ATTENTION_BACKENDS,
            f"attention_backend {self.attention_backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}",
        )
        need(
            isinstance(self.sequence_parallel, bool),
            f"sequence_parallel must be a bool, got {self.sequence_parallel!r}",
        )
        need(isinstance(self.compile, bool), f"compile must be a bool, got {self.compile!r}")


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


PLAIN = ModelRuntime()


def apply_runtime(model, runtime):
    """Make a built PhiForCausalLM run with `runtime` (in place; returns the model).

    Every submodule that reads a runtime choice holds the same ModelRuntime, so replacing it here
    switches them all. Compiling is the one step that cannot be taken back: a model whose blocks were
    compiled refuses a runtime with compile=False (build a new one to run eager)."""
    if not isinstance(runtime, ModelRuntime):
        raise TypeError(f"runtime must be a ModelRuntime, got {type(runtime).__name__}")
    was_compiled = model.runtime.compile
    if was_compiled and not runtime.compile:
        raise ValueError(
            "apply_runtime: this model's blocks are compiled and cannot be made eager again; "
            "build a new model for an eager run"
        )
    set_runtime(model, dataclasses.replace(runtime, compile=was_compiled))
    if runtime.compile and not was_compiled:
        from .compile import compile_decoder_layers

        compile_decoder_layers(model)  # in place and lazy: names and state dicts unchanged; records compile=True
    return model


def set_runtime(model, runtime):
    """Hand `runtime` to every module of `model` that holds one (no checks, no compiling: apply_runtime
    is the public way in)."""
    for module in model.modules():
        if isinstance(getattr(module, "runtime", None), ModelRuntime):
            module.runtime = runtime
