"""LR schedule values at key steps, computed by hand from the documented formula."""

import math

import pytest
import torch

from megaphi.training.lr_schedule import WarmupDecayLR


def _sched(**kw):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=123.0)
    return opt, WarmupDecayLR(opt, **kw)


def _lrs(sched, n):
    out = []
    for _ in range(n):
        out.append(sched.get_lr()[0])
        sched.step()
    return out


def test_linear_warmup_then_linear_decay_paper_shape():
    # phi-1 pretraining: max 1e-3, warmup 750, linear decay to 0 over 36000 updates
    opt, s = _sched(max_lr=1e-3, min_lr=0.0, warmup_iters=750, decay_iters=36000, decay_style="linear")
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 750)  # update 1
    assert s.lr_at(375) == pytest.approx(0.5e-3)
    assert s.lr_at(750) == pytest.approx(1e-3)
    assert s.lr_at(751) == pytest.approx(1e-3 * (1 - 1 / 35250))
    assert s.lr_at(18375) == pytest.approx(0.5e-3)  # halfway through the decay
    assert s.lr_at(36000) == 0.0
    assert s.lr_at(40000) == 0.0


def test_small_linear_sequence_and_min_lr():
    _, s = _sched(max_lr=1.0, min_lr=0.1, warmup_iters=2, decay_iters=5, decay_style="linear")
    # updates 1..7: 0.5, 1.0, then 0.1 + 0.9 * (1 - r) with r = 1/3, 2/3, 1, then min
    expected = [0.5, 1.0, 0.1 + 0.9 * 2 / 3, 0.1 + 0.9 / 3, 0.1, 0.1, 0.1]
    assert _lrs(s, 7) == pytest.approx(expected)


def test_cosine_and_constant():
    _, s = _sched(max_lr=2.0, min_lr=0.0, warmup_iters=0, decay_iters=4, decay_style="cosine")
    expected = [1.0 + math.cos(math.pi * k / 4) for k in (1, 2, 3, 4)]  # 0.5*(1+cos) * 2
    assert _lrs(s, 4) == pytest.approx(expected)
    assert _lrs(s, 1) == [0.0]
    _, c = _sched(max_lr=3e-4, min_lr=0.0, warmup_iters=3, decay_iters=10, decay_style="constant")
    assert _lrs(c, 6) == pytest.approx([1e-4, 2e-4, 3e-4, 3e-4, 3e-4, 3e-4])


def test_state_dict_restores_position_only():
    opt, s = _sched(max_lr=1.0, min_lr=0.0, warmup_iters=2, decay_iters=10)
    _lrs(s, 5)
    state = s.state_dict()
    opt2, s2 = _sched(max_lr=1.0, min_lr=0.0, warmup_iters=2, decay_iters=10)
    s2.load_state_dict(state)
    assert s2.num_steps == 5
    assert opt2.param_groups[0]["lr"] == pytest.approx(s.lr_at(6)) == pytest.approx(opt.param_groups[0]["lr"])


def test_bad_configuration():
    with pytest.raises(ValueError, match="warmup"):
        _sched(max_lr=1.0, warmup_iters=10, decay_iters=5)
    with pytest.raises(ValueError, match="decay style"):
        _sched(max_lr=1.0, warmup_iters=1, decay_iters=5, decay_style="step")
