"""torch.compile of the decoder blocks (the step's elementwise glue: bias+GELU, dropout+residual adds,
LayerNorm/rotary around their kernels, fused by Inductor).

Each PhiDecoderLayer is compiled in place (nn.Module.compile), so parameter names, state dicts and
checkpoints are unchanged. Layers share one compiled graph (parameters are graph inputs).
"""

import functools

import torch

COMPILE_CHOICES = ("off", "on", "auto")

# `auto` compiles on CUDA once a GPU run (tools/gpu_check.sh) has shown compiled blocks equal to eager
# and faster there; none has run yet, so `auto` is eager everywhere. On CPU compiling costs more start-up
# time than a short run saves, so `auto` stays eager there.
CUDA_DEFAULT_VERIFIED = False


def compile_enabled(choice, device_type):
    """Whether --torch-compile `choice` ("on", "off", "auto") compiles the blocks on `device_type`."""
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"--torch-compile must be one of {', '.join(COMPILE_CHOICES)}, got {choice!r}")
    if choice == "auto":
        return device_type == "cuda" and CUDA_DEFAULT_VERIFIED
    return choice == "on"


# Regions kept out of compiled graphs, each mapped to its torch.compiler.disable version once something
# is compiled. torch.compiler.disable / assume_constant_result import torch._dynamo, which costs about
# 2.5 s of start-up in every process, so nothing here calls them before compiling is asked for.
_EAGER_REGIONS: dict = {}


def eager_in_compiled_blocks(fn):
    """Run fn eagerly inside compiled blocks (one graph break there); plain calls go straight to fn."""
    _EAGER_REGIONS.setdefault(fn, None)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return _disabled(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return call


def _disabled(fn):
    if _EAGER_REGIONS.get(fn) is None:
        _EAGER_REGIONS[fn] = torch.compiler.disable(fn)
    return _EAGER_REGIONS[fn]


def prepare_for_compile():
    """What tracing megaphi's model needs, made before any tracing starts: the eager regions' disabled
    versions, and the kernel backend choice marked constant (its CUDA-runtime probes cannot be traced;
    it is then decided once per op, impl, device and dtype while tracing). compile_decoder_layers calls
    it; call it yourself before torch.compile of anything else that holds megaphi layers."""
    from megaphi.ops.backend import mark_choice_constant_for_compile

    for fn in list(_EAGER_REGIONS):
        _disabled(fn)
    mark_choice_constant_for_compile()


def compile_decoder_layers(model, mode=None):
    """Compile every decoder layer of a PhiForCausalLM in place; returns the model, whose runtime then
    says compile=True (apply_runtime with compile=True calls this). (Never fullgraph: each block breaks
    once, on purpose, at its eager attention core.)"""
    import dataclasses

    compile_layers(model.model.layers, mode)
    # the runtime's own set_runtime, written here by type so that runtime.py (which calls this) is not imported
    compiled = dataclasses.replace(model.runtime, compile=True)
    for module in model.modules():
        if type(getattr(module, "runtime", None)) is type(compiled):
            module.runtime = compiled
    return model


def compile_layers(layers, mode=None):
    """Compile each decoder layer of `layers` in place (lazily, at its first call; names and state dicts
    unchanged): what compile_decoder_layers does to a whole model, and a pipeline stage to its layers."""
    prepare_for_compile()
    for layer in layers:
        layer.compile(mode=mode, dynamic=False)
