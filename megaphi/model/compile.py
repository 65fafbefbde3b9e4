"""torch.compile of the decoder blocks (the step's elementwise glue: bias+GELU, dropout+residual adds,
LayerNorm/rotary around their kernels, fused by Inductor).

Each PhiDecoderLayer is compiled in place (nn.Module.compile), so parameter names, state dicts and
checkpoints are unchanged. Layers share one compiled graph (parameters are graph inputs).
"""
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


def compile_decoder_layers(model, mode=None, fullgraph=False):
    """Compile every decoder layer of a PhiForCausalLM in place; returns the model."""
    for layer in model.model.layers:
        layer.compile(mode=mode, fullgraph=fullgraph, dynamic=False)
    return model
