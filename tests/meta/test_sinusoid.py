"""Finn et al. 2017, section 5.1: sinusoid regression. Amplitude in [0.1, 5], phase in [0, π], x in
[-5, 5], K = 10, a 40-40 ReLU MLP, one inner step of size 0.01 (MSE). After meta-training, ONE step from
the MAML initialization must beat one step from a model pretrained jointly on all tasks by a wide margin.

The engine under test is `pipeline.meta.inner.adapt` (any nn.Module: here an MLP, not a FewShotNet),
batched over tasks with vmap, second order. Training is shortened from the paper's 70k iterations to fit
a CI budget; the gap is already large (the paper's Figure 3 shows the same ordering).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from pipeline.meta.inner import adapt_params, forward

K = 10
INNER_LR = 0.01


def sample_tasks(rng: np.random.Generator, n_tasks: int, n_points: int):
    amp = rng.uniform(0.1, 5.0, size=(n_tasks, 1, 1))
    phase = rng.uniform(0.0, math.pi, size=(n_tasks, 1, 1))
    x = rng.uniform(-5.0, 5.0, size=(n_tasks, n_points, 1))
    y = amp * np.sin(x - phase)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def one_step_query_mse(net: nn.Module, params, x_s, y_s, x_q, y_q, second_order: bool):
    def task(xs, ys, xq, yq):
        fast = adapt_params(
            net, params, xs, ys, steps=1, lr=INNER_LR, second_order=second_order, loss_fn=F.mse_loss
        )
        return F.mse_loss(forward(net, fast, xq), yq)

    return vmap(task)(x_s, y_s, x_q, y_q)


@pytest.fixture
def one_thread():
    # Tiny ops: intra-op threads only add synchronisation (and stall badly on a loaded 2-core machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.e2e
def test_maml_beats_joint_pretraining_after_one_step_on_sinusoids(one_thread):
    rng = np.random.default_rng(0)
    iters, meta_batch = 2500, 25

    maml = mlp(0)
    params = dict(maml.named_parameters())
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    for _ in range(iters):
        x, y = sample_tasks(rng, meta_batch, 2 * K)
        loss = one_step_query_mse(
            maml, params, x[:, :K], y[:, :K], x[:, K:], y[:, K:], second_order=True
        ).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    pre = mlp(0)  # same init, trained on the pooled data of all tasks (the paper's "pretrained" baseline)
    opt = torch.optim.Adam(pre.parameters(), lr=1e-3)
    for _ in range(iters):
        x, y = sample_tasks(rng, meta_batch, 2 * K)
        loss = F.mse_loss(pre(x.reshape(-1, 1)), y.reshape(-1, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    test_rng = np.random.default_rng(12345)
    x, y = sample_tasks(test_rng, 200, K + 100)
    with torch.enable_grad():
        mse_maml = one_step_query_mse(
            maml, dict(maml.named_parameters()), x[:, :K], y[:, :K], x[:, K:], y[:, K:], False
        )
        mse_pre = one_step_query_mse(
            pre, dict(pre.named_parameters()), x[:, :K], y[:, :K], x[:, K:], y[:, K:], False
        )
    m_maml, m_pre = float(mse_maml.mean().detach()), float(mse_pre.mean().detach())
    # the step itself helps MAML (it learned an initialization that is *sensitive* to the support set)
    with torch.no_grad():
        m_maml0 = float(F.mse_loss(maml(x[:, K:]), y[:, K:]))
    # pretrained ≈ predicting the mean over tasks (≈ amplitude² / 2 ≈ 3); MAML adapts to the task
    print(
        f"one-step query MSE: MAML {m_maml:.3f}, pretrained {m_pre:.3f}, MAML before the step {m_maml0:.3f}"
    )
    assert m_maml < 0.5 * m_pre, (m_maml, m_pre)
    assert m_maml < 0.8 * m_maml0, (m_maml, m_maml0)
