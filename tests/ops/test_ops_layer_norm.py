"""LayerNorm reference path (CPU): values against a float64 numpy formula, gradients, input checks."""

import numpy as np
import pytest
import torch

from megaphi.ops import LayerNorm, layer_norm, layer_norm_reference
from megaphi.ops import backend
from megaphi.ops.layer_norm import check_layer_norm_inputs, check_layer_norm_kernel_inputs, layer_norm_kernel_problem


def numpy_layer_norm(x, weight, bias, eps):
    x = x.astype(np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight.astype(np.float64) + bias.astype(np.float64)


@pytest.mark.parametrize("shape", [(3, 7), (2, 5, 1000), (4, 1), (1, 2048)])
def test_layer_norm_matches_numpy(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 0.5
    weight = torch.randn(shape[-1], generator=gen, dtype=torch.float64)
    bias = torch.randn(shape[-1], generator=gen, dtype=torch.float64)
    expected = numpy_layer_norm(x.numpy(), weight.numpy(), bias.numpy(), 1e-5)
    for out in (
        layer_norm(x, weight, bias, 1e-5),
        layer_norm_reference(x, weight, bias, 1e-5),
        layer_norm(x, weight, bias, 1e-5, impl="torch"),
    ):
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_layer_norm_float32_close_to_float64():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1000, generator=gen)
    weight, bias = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    expected = numpy_layer_norm(x.numpy(), weight.numpy(), bias.numpy(), 1e-5)
    np.testing.assert_allclose(layer_norm(x, weight, bias).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_layer_norm_module_names_and_values():
    module = LayerNorm(8, eps=1e-5)
    assert sorted(name for name, _ in module.named_parameters()) == ["bias", "weight"]
    with torch.no_grad():
        module.weight.copy_(torch.linspace(0.5, 2.0, 8))
        module.bias.copy_(torch.linspace(-1.0, 1.0, 8))
    x = torch.randn(2, 3, 8)
    expected = numpy_layer_norm(x.numpy(), module.weight.detach().numpy(), module.bias.detach().numpy(), 1e-5)
    np.testing.assert_allclose(module(x).detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert "8, eps=1e-05" in repr(module)


def test_layer_norm_gradcheck_float64():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w, b: layer_norm(a, w, b, 1e-5), (x, weight, bias))


def test_layer_norm_rejects_bad_shapes_and_dtypes():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight has shape \(7,\).*hidden size .* is 8"):
        layer_norm(x, torch.ones(7), torch.zeros(8))
    with pytest.raises(ValueError, match="bias has shape"):
        layer_norm(x, torch.ones(8), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="weight dtype torch.float64 differs from x dtype torch.float32"):
        layer_norm(x, torch.ones(8, dtype=torch.float64), torch.zeros(8))
    with pytest.raises(ValueError, match="bias is on meta"):
        layer_norm(x, torch.ones(8), torch.zeros(8, device="meta"))
    with pytest.raises(ValueError, match="at least one dimension"):
        layer_norm(torch.tensor(1.0), torch.ones(1), torch.zeros(1))


def test_kernel_input_checks():
    x, weight, bias = torch.randn(4, 8), torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match="x is not contiguous.*call .contiguous"):
        check_layer_norm_kernel_inputs(torch.randn(8, 4).t(), weight, bias)
    with pytest.raises(TypeError, match="dtype torch.float64 is not supported"):
        check_layer_norm_kernel_inputs(x.double(), weight.double(), bias.double())
    with pytest.raises(ValueError, match="needs both weight and bias"):
        check_layer_norm_kernel_inputs(x, weight, None)
    with pytest.raises(ValueError, match="x is on cpu, not a CUDA device"):
        check_layer_norm_kernel_inputs(x, weight, bias)
    check_layer_norm_inputs(x, weight, None)  # bias-free LayerNorm is fine for the reference


def test_kernel_problem_names_what_the_kernel_cannot_take():
    x, weight, bias = torch.randn(4, 8), torch.ones(8), torch.zeros(8)
    assert layer_norm_kernel_problem(torch.randn(8, 4).t(), weight, bias)[0] is ValueError
    assert "not contiguous" in layer_norm_kernel_problem(torch.randn(8, 4).t(), weight, bias)[1]
    assert "needs both weight and bias" in layer_norm_kernel_problem(x, None, bias)[1]
    assert layer_norm_kernel_problem(x.double(), weight.double(), bias.double())[0] is TypeError
    assert "not a CUDA device" in layer_norm_kernel_problem(x, weight, bias)[1]


def test_auto_falls_back_to_torch_when_the_kernel_cannot_take_the_input(monkeypatch):
    # Pretend the dispatcher chose the kernel (as it does for CUDA tensors on a usable GPU): under
    # "auto" an input the kernel cannot take must go to the torch reference, never raise; an
    # explicit "cuda" must still raise the clear error. Launching the kernel here would fail, so
    # reaching it at all fails the test.
    monkeypatch.setattr(backend, "resolve", lambda op, impl, tensor: "cuda")
    monkeypatch.setattr(backend, "cuda_module", lambda: pytest.fail("the kernel must not be launched"))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, generator=gen).t()  # non-contiguous
    weight, bias = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    want = numpy_layer_norm(x.numpy(), weight.numpy(), bias.numpy(), 1e-5)
    for impl in ("auto", None):  # None = the selected backend, "auto" by default
        got = layer_norm(x, weight, bias, impl=impl)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    got = layer_norm(x.contiguous(), weight, bias, impl="auto")  # contiguous but on the CPU: torch too
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="x is not contiguous"):
        layer_norm(x, weight, bias, impl="cuda")
