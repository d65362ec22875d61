"""handlers/lbfgs.py (numpy) reaches the minimum torch.optim.LBFGS reaches, on the linear head's problem.

torch here is the reference the solver replaced (tests are not the warm path that must not import it).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from handlers.heads import LinearHead, softmax_regression_objective
from handlers.lbfgs import minimise


def _problem(seed: int, rows: int = 120, dim: int = 64, classes: int = 5, weight_decay: float = 1e-3):
    """Overlapping Gaussian classes, unbalanced (class-weighted loss), unit-norm rows: the head's case."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(rows // classes)[: rows - 7]
    x = F.normalize(torch.randn(classes, dim, generator=generator)[labels] + 1.5 * torch.randn(len(labels), dim, generator=generator), dim=1)
    counts = torch.bincount(labels, minlength=classes).float()
    class_weights = counts.sum() / (classes * counts)

    def loss_of(weight, bias):
        return F.cross_entropy(x @ weight.T + bias, labels, weight=class_weights) + weight_decay * weight.pow(2).sum()

    return x, classes, loss_of


def _torch_lbfgs(loss_of, classes: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The reference: torch.optim.LBFGS (strong Wolfe line search) on autograd's gradient of
    ``loss_of(weight, bias)`` from zeros. Returns (weight (C, D), bias (C,), final loss)."""
    weight = torch.zeros(classes, dim, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=200, history_size=20,
                                  tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_of(weight, bias)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach(), float(loss_of(weight, bias).detach())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reaches_the_minimum_of_torch_lbfgs(seed):
    x, classes, loss_of = _problem(seed)
    dim = x.shape[1]

    def loss_and_grad(parameters: np.ndarray):
        parameters = torch.from_numpy(parameters).requires_grad_(True)
        loss = loss_of(parameters[: classes * dim].view(classes, dim), parameters[classes * dim:])
        return float(loss.detach()), torch.autograd.grad(loss, parameters)[0].numpy()

    with torch.enable_grad():
        ours = minimise(loss_and_grad, np.zeros(classes * dim + classes, np.float32))
        ours_loss, ours_grad = loss_and_grad(ours)
    weight, bias, reference_loss = _torch_lbfgs(loss_of, classes, dim)

    start_loss = loss_and_grad(np.zeros(classes * dim + classes, np.float32))[0]
    assert ours.dtype == np.float32  # the precision of the start, as the torch head solved in
    assert ours_loss < start_loss / 2  # it moved
    assert ours_loss <= reference_loss + 1e-5, (ours_loss, reference_loss)
    assert float(np.abs(ours_grad).max()) < 1e-3
    # Same minimum, same classifier: the predictions agree.
    ours_weight = torch.from_numpy(ours[: classes * dim].reshape(classes, dim))
    ours_bias = torch.from_numpy(ours[classes * dim:])
    assert torch.equal((x @ ours_weight.T + ours_bias).argmax(1), (x @ weight.T + bias).argmax(1))


def test_the_linear_heads_own_objective_reaches_the_minimum_of_torch_lbfgs():
    """The whole numpy path of LinearHead._solve (written-out gradient, float32) against torch's
    optimiser on autograd's gradient of the same loss."""
    x, classes, loss_of = _problem(4, weight_decay=1e-2)
    labels = torch.arange(classes).repeat_interleave(120 // classes)[: 120 - 7]
    head = LinearHead(x.shape[1], classes)
    weight, bias = head._solve(x.numpy(), labels.numpy(), 1e-2, max_iter=200)
    ours_loss = float(loss_of(torch.from_numpy(weight), torch.from_numpy(bias)))
    reference_weight, _, reference_loss = _torch_lbfgs(loss_of, classes, x.shape[1])
    assert ours_loss <= reference_loss + 1e-5, (ours_loss, reference_loss)
    assert np.allclose(weight, reference_weight.numpy(), atol=2e-3)


def test_stops_at_once_on_a_minimum():
    calls = []

    def loss_and_grad(parameters):
        calls.append(1)
        return float((parameters ** 2).sum()), 2 * parameters

    result = minimise(loss_and_grad, np.zeros(4, np.float32))
    assert np.array_equal(result, np.zeros(4)) and len(calls) == 1


def test_fitting_a_linear_head_imports_no_torch():
    """The reason this solver exists: importing torch costs 1.7 s of a warm train_head's 2 s, and
    torch.optim would pull in torch._dynamo and sympy on top (over a second)."""
    code = ("import sys, numpy as np; from handlers.heads import build_head; "
            "head = build_head('linear', 16, 3); "
            "head.fit(np.random.default_rng(0).normal(size=(30, 16)).astype(np.float32), np.tile(np.arange(3), 10), "
            "weight_decay=1e-2); "
            "print('torch' in sys.modules, 'sympy' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_the_linear_heads_written_out_gradient_is_autograds():
    x, classes, loss_of = _problem(3, weight_decay=3e-3)
    labels = torch.arange(classes).repeat_interleave(120 // classes)[: 120 - 7]
    objective = softmax_regression_objective(x.numpy(), labels.numpy(),
                                             LinearHead._class_weights(labels.numpy(), classes), 3e-3)
    parameters = torch.randn(classes * x.shape[1] + classes, generator=torch.Generator().manual_seed(0))
    loss, grad = objective(parameters.numpy())
    with torch.enable_grad():
        reference = parameters.clone().requires_grad_(True)
        dim = x.shape[1]
        expected = loss_of(reference[: classes * dim].view(classes, dim), reference[classes * dim:])
        (expected_grad,) = torch.autograd.grad(expected, reference)
    assert loss == pytest.approx(float(expected.detach()), rel=1e-5)
    assert grad.dtype == np.float32 and np.allclose(grad, expected_grad.numpy(), atol=1e-6)
