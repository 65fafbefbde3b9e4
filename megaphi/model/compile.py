"""torch.compile of the decoder blocks (the step's elementwise glue: bias+GELU, dropout+residual adds,
LayerNorm/rotary around their kernels, fused by Inductor).

Each PhiDecoderLayer is compiled in place (nn.Module.compile), so parameter names, state dicts and
checkpoints are unchanged. Layers share one compiled graph (parameters are graph inputs).
"""
import torch

COMPILE_CHOICES = ("off", "on", "auto")


def compile_enabled(choice, device):
    """--torch-compile: "on", "off", or "auto" (off: on by default only once verified on a GPU)."""
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"--torch-compile must be one of {', '.join(COMPILE_CHOICES)}, got {choice!r}")
    return choice == "on"


def compile_decoder_layers(model, mode=None, fullgraph=False):
    """Compile every decoder layer of a PhiForCausalLM in place; returns the model."""
    for layer in model.model.layers:
        layer.compile(mode=mode, fullgraph=fullgraph, dynamic=False)
    return model
