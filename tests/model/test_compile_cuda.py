"""Compiled decoder blocks on a GPU: megaphi's CUDA LayerNorm and rotary kernels stay graph nodes
(custom ops) and the compiled model trains like the eager one.

bf16 compiled vs eager differ by Inductor's fusions (one rounding instead of several), so the bounds
are bf16-sized: 2^-7 relative to each tensor's largest magnitude, loose enough for rounding and far
below what a wrong gradient gives (order 1). Runs only where a CUDA GPU and megaphi._cuda are usable.
"""

import copy

import pytest
import torch

from megaphi.config import PhiConfig

pytestmark = pytest.mark.cuda
BF16_TOL = 2.0**-7


def _kernels_ready():
    from megaphi.ops import backend

    return torch.cuda.is_available() and backend.cuda_unavailable_reason(0) is None


def _setup(**switches):
    from megaphi.model import ModelRuntime, PhiForCausalLM

    if not _kernels_ready():
        pytest.skip("megaphi._cuda kernels are not usable on this GPU")
    torch._dynamo.reset()
    config = PhiConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        rotary_dim=32,
        max_position_embeddings=256,
        attention_dropout=0.0,
        resid_dropout=0.0,
        embd_dropout=0.0,
    )
    model = PhiForCausalLM(config, init_seed=3, runtime=ModelRuntime(**switches)).to("cuda", torch.bfloat16).train()
    ids = torch.randint(0, 512, (2, 129), generator=torch.Generator().manual_seed(0)).cuda()
    return model, ids[:, :-1], ids[:, 1:]


def _run(model, ids, labels):
    losses, _ = model(ids, labels=labels, reduction="none")
    losses.float().sum().backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return losses.float().detach(), grads


@pytest.mark.parametrize(
    "recompute", [{}, dict(recompute="selective"), dict(recompute="full")], ids=["none", "selective", "full"]
)
def test_compiled_blocks_equal_eager_on_gpu(recompute):
    from megaphi.model.compile import compile_decoder_layers

    model, ids, labels = _setup(**recompute)
    want = _run(model, ids, labels)
    got = _run(compile_decoder_layers(copy.deepcopy(model)), ids, labels)
    for name, a, e in [("losses", got[0], want[0])] + [(n, got[1][n], want[1][n]) for n in want[1]]:
        assert (a - e).abs().max() <= BF16_TOL * e.abs().max(), name


def test_cuda_kernels_are_graph_nodes():
    model, ids, _ = _setup()
    layer = model.model.layers[0]
    cos, sin = model.model.rotary(ids.device, ids.shape[1])
    hidden = torch.randn(2, ids.shape[1], 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    from megaphi.model.compile import prepare_for_compile

    prepare_for_compile()
    explanation = torch._dynamo.explain(layer)(hidden, cos, sin)
    assert explanation.graph_break_count == 1, [str(b.reason) for b in explanation.break_reasons]
    ops = {str(node.target) for graph in explanation.graphs for node in graph.graph.nodes}
    assert {"megaphi.layer_norm_forward.default", "megaphi.rotary_qk.default"} <= ops, sorted(ops)
