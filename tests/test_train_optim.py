"""The release's optimizer recipe: parameter groups and the warmup + cosine schedule."""

import itertools
import math

import pytest
import torch
from torch import nn

from morphmlp.train import optim


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, 4, 8))  # named in no_weight_decay()
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def no_weight_decay(self):
        return {"pos"}


def test_no_weight_decay_on_1d_params_norms_biases_and_named():
    model = Tiny()
    decay, no_decay = optim.param_groups(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == {"fc.weight", "head.weight"}
    assert {names[id(p)] for p in no_decay["params"]} == {
        "pos",
        "fc.bias",
        "norm.weight",
        "norm.bias",
        "head.bias",
    }


def test_schedule_warmup_then_cosine_at_key_steps():
    kw = dict(base_lr=1e-3, total_steps=110, warmup_steps=10, warmup_start_lr=1e-6, min_lr=1e-6)
    assert optim.lr_at(0, **kw) == pytest.approx(1e-6)
    assert optim.lr_at(5, **kw) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert optim.lr_at(10, **kw) == pytest.approx(1e-3)  # warmup ends at the peak
    mid = 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert optim.lr_at(60, **kw) == pytest.approx(mid)  # halfway through the cosine
    assert optim.lr_at(110, **kw) == pytest.approx(1e-6)  # the end LR at the last step
    lrs = [optim.lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))  # monotone after warmup


def test_optimizer_applies_groups_and_set_lr():
    model = Tiny()
    opt = optim.build_optimizer(model, lr=0.1, weight_decay=0.05, betas=(0.9, 0.999))
    assert isinstance(opt, torch.optim.AdamW)
    optim.set_lr(opt, 0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]
    # a decayed weight shrinks with zero gradient; a non-decayed one does not move
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with torch.no_grad():
        model.fc.weight.fill_(1.0)
        model.norm.weight.fill_(1.0)
    opt.step()
    assert torch.all(model.fc.weight < 1.0)
    assert torch.all(model.norm.weight == 1.0)
