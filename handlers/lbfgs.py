"""Full-batch L-BFGS for the linear head's small, smooth, convex problem.

The two-loop recursion of Nocedal and Wright, *Numerical Optimization* (2nd ed., 2006), Algorithm
7.4, with a backtracking line search on the Armijo condition (their Algorithm 3.1). On a convex
objective every step keeps the curvature pair positive, so the simple line search suffices, and the
method reaches the same minimum as torch.optim.LBFGS (tests/unit/test_lbfgs.py compares them).

Why not torch.optim.LBFGS: a warm train_head never imports torch (its import alone costs 1.7 s of a
2 s budget), and constructing any torch.optim optimizer imports torch._dynamo and sympy on its first
use (torch wraps ``Optimizer.__init__`` in ``torch._disable_dynamo``), over a second more
(docs/bench/runtime.md). numpy, in the precision of ``start`` (the linear head's: float32, as its
torch version ran). Only training imports this module (``LinearHead.fit``); serving workers never do.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

ARMIJO = 1e-4  # sufficient decrease: f(x + t d) <= f(x) + ARMIJO * t * g.d (Nocedal and Wright's c1)
MIN_STEP = 1e-10  # a line search shrinking the step below this gives up (no decrease possible)


def minimise(
    loss_and_grad: Callable[[np.ndarray], tuple[float, np.ndarray]],
    start: np.ndarray,
    *,
    max_iter: int = 200,
    history_size: int = 20,
    tolerance_grad: float = 1e-6,
    tolerance_change: float = 1e-9,
) -> np.ndarray:
    """Minimise a smooth function of one flat parameter vector.

    ``loss_and_grad``: (P,) float64 or float32 parameters -> (loss, (P,) gradient).
    ``start``: (P,) initial parameters. Returns the (P,) parameters after at most ``max_iter``
    iterations, stopping early when the largest gradient entry is at most ``tolerance_grad`` or the
    loss or the step changes by less than ``tolerance_change`` (torch.optim.LBFGS's stopping rules).
    """
    x = np.array(start)
    loss, grad = loss_and_grad(x)
    steps: list[np.ndarray] = []  # s_k = x_{k+1} - x_k
    changes: list[np.ndarray] = []  # y_k = g_{k+1} - g_k
    for iteration in range(max_iter):
        if float(np.abs(grad).max()) <= tolerance_grad:
            break
        direction = -_inverse_hessian_times(grad, steps, changes)
        slope = float(grad.dot(direction))
        if slope > -tolerance_change:  # not a descent direction any more: converged to rounding
            break
        # The first direction is the raw gradient, whose length has no meaning: scale the trial
        # step as torch.optim.LBFGS does (min(1, 1 / |g|_1)); later ones are scaled by the history.
        step = min(1.0, 1.0 / float(np.abs(grad).sum())) if iteration == 0 else 1.0
        while True:
            candidate = x + step * direction
            new_loss, new_grad = loss_and_grad(candidate)
            if new_loss <= loss + ARMIJO * step * slope or step < MIN_STEP:
                break
            step /= 2.0
        step_taken, change = candidate - x, new_grad - grad
        if float(step_taken.dot(change)) > 1e-10:  # curvature pair usable (always, on a convex loss)
            steps.append(step_taken)
            changes.append(change)
            if len(steps) > history_size:
                steps.pop(0)
                changes.pop(0)
        converged = abs(new_loss - loss) < tolerance_change or float(np.abs(step_taken).max()) <= tolerance_change
        x, loss, grad = candidate, new_loss, new_grad
        if converged:
            break
    return x


def _inverse_hessian_times(grad: np.ndarray, steps: list[np.ndarray], changes: list[np.ndarray]) -> np.ndarray:
    """The two-loop recursion: H_k g for the L-BFGS inverse-Hessian estimate H_k (P,) -> (P,)."""
    q = grad.copy()
    rhos = [1.0 / float(s.dot(y)) for s, y in zip(steps, changes)]
    alphas = []
    for s, y, rho in zip(reversed(steps), reversed(changes), reversed(rhos)):
        alpha = rho * float(s.dot(q))
        q -= alpha * y
        alphas.append(alpha)
    if steps:  # initial Hessian gamma I, gamma = s'y / y'y of the latest pair (Nocedal and Wright eq. 7.20)
        q *= float(steps[-1].dot(changes[-1])) / float(changes[-1].dot(changes[-1]))
    for s, y, rho, alpha in zip(steps, changes, rhos, reversed(alphas)):
        beta = rho * float(y.dot(q))
        q += (alpha - beta) * s
    return q
