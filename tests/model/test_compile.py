"""Compiled decoder blocks (torch.compile, Inductor on CPU) equal the eager model.

megaphi's LayerNorm and rotary kernels are torch custom ops (torch.library) with fake
implementations, so a compiled block keeps them as graph nodes. Without a GPU the ops' CPU
implementations (the kernels' arithmetic written in torch) stand in for the kernels: the
`kernel_ops_on_cpu` fixture routes the model's LayerNorm and rotary through them, exactly the
calls a CUDA run makes.

Equality is checked in float64, where compiled and eager differ only by summation order (about
1e-15 relative), so the 1e-9 bounds hold on any CPU. With dropout on, Inductor draws its own
masks (seeded from torch's generator): compiled runs equal eager in law, and equal each other
across recompute modes, because recompute replays the generator states.
"""

import copy
import importlib

import pytest
import torch

from megaphi.config import PhiConfig
from megaphi.model.compile import prepare_for_compile

CONFIG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    rotary_dim=8,
    max_position_embeddings=32,
)
RECOMPUTE = {"none": {}, "selective": dict(recompute="selective"), "full": dict(recompute="full")}
TOL = 1e-9  # float64: relative to the largest magnitude of each compared tensor


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def kernel_ops_on_cpu(monkeypatch):
    """Dispatch LayerNorm and rotary to megaphi's custom ops (CPU implementations) as on a GPU."""
    from megaphi.ops import backend

    layer_norm = importlib.import_module("megaphi.ops.layer_norm")  # the package exports a function of that name
    rotary = importlib.import_module("megaphi.ops.rotary")
    monkeypatch.setattr(backend, "_resolve_on", lambda op, impl, *device: "cuda")
    monkeypatch.setattr(layer_norm, "layer_norm_kernel_problem", lambda *a: None)
    monkeypatch.setattr(rotary, "rotary_kernel_problem", lambda *a, **k: None)
    calls = {"layer_norm": 0, "rotary": 0}
    forward, rotary_op = layer_norm.layer_norm_forward, rotary.rotary_qk

    def counted(name, op):
        def call(*args):
            calls[name] += 1
            return op(*args)

        return call

    monkeypatch.setattr(layer_norm, "layer_norm_forward", counted("layer_norm", forward))
    monkeypatch.setattr(rotary, "rotary_qk", counted("rotary", rotary_op))
    return calls


def _model(dropout=0.0, attention_dropout=None, **switches):
    from megaphi.model import ModelRuntime, PhiForCausalLM

    config = PhiConfig(
        **CONFIG,
        attention_dropout=dropout if attention_dropout is None else attention_dropout,
        resid_dropout=dropout,
        embd_dropout=0.0,
    )
    return PhiForCausalLM(config, init_seed=5, runtime=ModelRuntime(**switches)).double().train()


def _batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 17), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _loss_and_grads(model, seed=0):
    from megaphi.parallel.random import model_parallel_seed

    model_parallel_seed(seed)
    ids, labels = _batch()
    token_losses, _ = model(ids, labels=labels, reduction="none")
    token_losses.sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return token_losses.detach(), grads


def _compiled(model):
    """A compiled copy of the eager model, through the runtime (the path training takes)."""
    import dataclasses

    from megaphi.model import apply_runtime

    compiled = apply_runtime(copy.deepcopy(model), dataclasses.replace(model.runtime, compile=True))
    assert compiled.runtime.compile and not model.runtime.compile
    return compiled


def _assert_close(got, want, what):
    scale = want.abs().max().clamp(min=1e-30)
    error = (got - want).abs().max()
    assert error <= TOL * scale, f"{what}: max difference {error:.3g} vs {TOL} x {scale:.3g}"


def _assert_same_run(got, want):
    _assert_close(got[0], want[0], "token losses")
    for name in want[1]:
        _assert_close(got[1][name], want[1][name], f"grad of {name}")


def test_kernel_ops_registration():
    """Schema, fake (meta) shapes, autograd registration and AOT dispatch of the custom ops."""
    from megaphi.ops.layer_norm import layer_norm_backward, layer_norm_forward
    from megaphi.ops.rotary import rotary_qk, rotary_tables

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    w = torch.randn(16, generator=g, requires_grad=True)
    b = torch.randn(16, generator=g, requires_grad=True)
    torch.library.opcheck(layer_norm_forward, (x, w, b, 1e-5))
    y, mean, rstd = layer_norm_forward(x.detach(), w.detach(), b.detach(), 1e-5)
    torch.library.opcheck(layer_norm_backward, (torch.randn_like(y), x.detach(), w.detach(), mean, rstd))
    cos, sin = rotary_tables(8, 12)
    q = torch.randn(2, 6, 3, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 6, 1, 16, generator=g, requires_grad=True)
    torch.library.opcheck(rotary_qk, (q, k, cos, sin, None, 2, False))
    positions = torch.tensor([[5, 1, 0, 7, 11, 3], [0, 1, 2, 3, 4, 5]])
    torch.library.opcheck(rotary_qk, (q, k, cos, sin, positions, 0, False))


def test_kernel_ops_cpu_equal_float64_references():
    """The CPU implementations (standing in for the kernels below) against autograd of F.layer_norm
    and of the rotary reference, in float64."""
    from megaphi.ops.layer_norm import layer_norm_kernel
    from megaphi.ops.rotary import rotary_qk, rotary_reference, rotary_tables

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, 24, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(24, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 7, 24, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(layer_norm_kernel(x, w, b, 1e-5), (x, w, b), dy)
    want = torch.autograd.grad(torch.nn.functional.layer_norm(x, (24,), w, b, 1e-5), (x, w, b), dy)
    for name, a, e in zip(("dx", "dweight", "dbias"), got, want):
        _assert_close(a, e, f"layer norm {name}")
    _assert_close(
        layer_norm_kernel(x, w, b, 1e-5), torch.nn.functional.layer_norm(x, (24,), w, b, 1e-5), "layer norm y"
    )

    cos, sin = rotary_tables(8, 20)
    q = torch.randn(2, 5, 3, 12, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 3, 12, generator=g, dtype=torch.float64, requires_grad=True)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    q_rot, k_rot = rotary_qk(q, k, cos, sin, None, 4, False)
    _assert_close(q_rot, rotary_reference(q, cos, sin, offset=4), "rotary q")
    got = torch.autograd.grad((q_rot, k_rot), (q, k), (dq, dk))
    want = torch.autograd.grad(
        (rotary_reference(q, cos, sin, offset=4), rotary_reference(k, cos, sin, offset=4)), (q, k), (dq, dk)
    )
    for name, a, e in zip(("dq", "dk"), got, want):
        _assert_close(a, e, f"rotary {name}")


def test_kernel_ops_stay_in_the_compiled_graph(kernel_ops_on_cpu):
    """One graph break per block, the eager attention core; LayerNorm and rotary are graph nodes."""
    model = _model()
    layer = model.model.layers[0]
    cos, sin = model.model.rotary(torch.device("cpu"), 16)
    hidden = torch.randn(2, 16, CONFIG["hidden_size"], dtype=torch.float64, requires_grad=True)
    prepare_for_compile()  # what compile_decoder_layers does before compiling
    explanation = torch._dynamo.explain(layer)(hidden, cos, sin)
    reasons = [str(b.reason).splitlines()[0] for b in explanation.break_reasons]
    assert explanation.graph_break_count == 1, reasons
    assert "disable" in reasons[0]
    ops = {str(node.target) for graph in explanation.graphs for node in graph.graph.nodes}
    assert {"megaphi.layer_norm_forward.default", "megaphi.rotary_qk.default"} <= ops, sorted(ops)


@pytest.mark.parametrize("recompute", list(RECOMPUTE))
def test_compiled_equals_eager_with_kernel_ops(kernel_ops_on_cpu, recompute):
    eager = _model(**RECOMPUTE[recompute])
    want = _loss_and_grads(eager)
    calls = dict(kernel_ops_on_cpu)
    got = _loss_and_grads(_compiled(eager))
    _assert_same_run(got, want)
    assert kernel_ops_on_cpu["layer_norm"] > calls["layer_norm"] and kernel_ops_on_cpu["rotary"] > calls["rotary"]


def test_compiled_equals_eager_with_torch_ops():
    """The CPU default: LayerNorm and rotary in plain torch, fused by Inductor."""
    eager = _model()
    _assert_same_run(_loss_and_grads(_compiled(eager)), _loss_and_grads(eager))


def test_attention_dropout_under_compile_draws_eager_masks(kernel_ops_on_cpu):
    """The attention core runs eagerly on the tensor-parallel RNG stream inside compiled blocks, so
    with attention dropout alone a compiled run repeats the eager run's masks."""
    eager = _model(dropout=0.0, attention_dropout=0.3)
    want = _loss_and_grads(eager, seed=3)
    _assert_same_run(_loss_and_grads(_compiled(eager), seed=3), want)
    assert (_loss_and_grads(eager, seed=4)[0] - want[0]).abs().max() > 1e-3  # the masks do depend on the seed


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_under_compile_replays_dropout(recompute):
    """Compiled, with attention and residual dropout: recompute gives the gradients of the run without
    recompute (the replayed forward draws the same masks) on the same seed."""
    want = _loss_and_grads(_compiled(_model(dropout=0.2)), seed=11)
    got = _loss_and_grads(_compiled(_model(dropout=0.2, **RECOMPUTE[recompute])), seed=11)
    _assert_same_run(got, want)


def test_compiled_residual_dropout_in_law():
    """Compiled block, residual dropout p: every output element is x + (m1 * attn + m2 * mlp) / (1 - p)
    with m1, m2 in {0, 1}, where attn and mlp are the eager sublayer outputs; the masks keep each
    element with probability 1 - p, independently (checked within 5 binomial standard deviations)."""
    p = 0.25
    model = _model(dropout=p, attention_dropout=0.0)
    layer = model.model.layers[0]
    cos, sin = model.model.rotary(torch.device("cpu"), 16)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 16, CONFIG["hidden_size"], generator=g, dtype=torch.float64)
    with torch.no_grad():
        h = layer.input_layernorm(x)
        attn, mlp = layer.self_attn(h, cos, sin), layer.mlp(h)
        compiled = copy.deepcopy(layer)
        prepare_for_compile()
        compiled.compile(dynamic=False)
        torch.manual_seed(0)
        delta = (compiled(x, cos, sin) - x) * (1 - p)
    candidates = torch.stack([torch.zeros_like(attn), attn, mlp, attn + mlp])  # (m1, m2) = 00, 10, 01, 11
    distance = (delta[None] - candidates).abs()
    best = distance.argmin(dim=0)
    assert (distance.min(dim=0).values <= 1e-12 * candidates.abs().max()).all(), "an element is no mask pattern"
    ambiguous = (distance < 1e-6).sum(dim=0) > 1
    best = best[~ambiguous]
    n = best.numel()
    kept_attn, kept_mlp = ((best == 1) | (best == 3)).double().mean(), ((best == 2) | (best == 3)).double().mean()
    both = (best == 3).double().mean()
    for observed, expected in ((kept_attn, 1 - p), (kept_mlp, 1 - p), (both, (1 - p) ** 2)):
        sd = (expected * (1 - expected) / n) ** 0.5
        assert abs(observed - expected) <= 5 * sd, (observed, expected, n)


def _tensor_parallel_worker(rank, world, sequence_parallel):
    from megaphi.parallel import state

    torch._dynamo.reset()
    state.initialize_model_parallel(world)
    eager = _model(sequence_parallel=sequence_parallel)
    want = _loss_and_grads(eager)
    _assert_same_run(_loss_and_grads(_compiled(eager)), want)
    state.destroy_model_parallel()


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
@pytest.mark.distributed
def test_compiled_equals_eager_tensor_parallel(sequence_parallel):
    """TP=2 over gloo: the communication's autograd functions are traced into the compiled blocks."""
    from dist_utils import run_distributed

    run_distributed(_tensor_parallel_worker, 2, sequence_parallel)


def test_compile_switch_choices():
    from megaphi.model.compile import CUDA_DEFAULT_VERIFIED, compile_enabled

    assert compile_enabled("on", "cpu") and not compile_enabled("off", "cuda")
    assert not compile_enabled("auto", "cpu")
    assert compile_enabled("auto", "cuda") == CUDA_DEFAULT_VERIFIED
    with pytest.raises(ValueError, match="--torch-compile"):
        compile_enabled("yes", "cpu")


def test_pretrain_torch_compile_flag(tmp_path, capsys):
    """`--torch-compile on` trains with compiled blocks (the start-up line says so) from the same first
    loss as eager; later losses differ by rounding amplified by Adam, so only the first is compared."""
    import re
    from megaphi import pretrain

    first_losses = {}
    for choice in ("off", "on"):
        argv = [
            "--model",
            "tiny",
            "--num-layers",
            "2",
            "--hidden-size",
            "32",
            "--num-attention-heads",
            "2",
            "--ffn-hidden-size",
            "64",
            "--rotary-dim",
            "8",
            "--seq-length",
            "16",
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "4",
            "--train-iters",
            "2",
            "--log-interval",
            "1",
            "--lr",
            "1e-3",
            "--lr-warmup-iters",
            "0",
            "--eval-iters",
            "0",
            "--mock-data",
            "--seed",
            "3",
            "--attention-dropout",
            "0",
            "--hidden-dropout",
            "0",  # Inductor draws other masks
            "--torch-compile",
            choice,
            "--log-dir",
            str(tmp_path / choice),
        ]
        assert pretrain.main(argv) in (0, None)
        out = capsys.readouterr().out
        assert ("blocks compiled (torch.compile)" if choice == "on" else "blocks eager") in out
        first_losses[choice] = float(re.search(r"iteration +1/2 .*?\| loss ([0-9.]+)", out).group(1))
    assert first_losses["on"] == pytest.approx(first_losses["off"], rel=1e-5)


def test_importing_the_model_does_not_import_dynamo():
    """torch._dynamo costs seconds of start-up: only compiling may import it."""
    import subprocess
    import sys

    code = "import sys, megaphi.model, megaphi.pretrain; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
