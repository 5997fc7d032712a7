"""Benchmark 2b: the fit's optimizer, torch's fused ``torch.optim.Adam`` vs the old ``FusedAdam``.

``FusedAdam`` (removed from the product: it called private ``torch._foreach_*``
functions) is kept here as the baseline. Both run the same fits (1 particle,
compiled step, same seed) with the optimizer swapped in
:func:`vimodels.svi.loop.make_optimizer`; fits alternate between the two so
both see the same machine load. Printed: loop time per step for each and the
ratio torch / fused (the issue's rule: keep torch's unless it costs more than 5 %).

Usage: python benchmarks/bench_optim.py [--steps N] [--repeats R]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

import vimodels  # noqa: E402
from vimodels.svi import loop  # noqa: E402
from vimodels.svi.optim import Adam  # noqa: E402

CASES = (
    ("eight_schools_noncentered", "structured"),
    ("radon_contextual", "structured"),
    ("radon_varying_intercept_noncentered", "full_rank"),
)


class FusedAdam:
    """The previous optimizer: one Adam step over all parameters with ``torch._foreach`` calls."""

    def __init__(self, lr: float, gamma: float = 1.0, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr, self.gamma, self.betas, self.eps = lr, gamma, betas, eps
        self._state: dict = {}

    def __call__(self, params) -> None:
        self.lr *= self.gamma
        ps = [p for p in params if p.grad is not None]
        if not ps:
            return
        for p in ps:
            if p not in self._state:
                self._state[p] = [0, torch.zeros_like(p), torch.zeros_like(p)]
        states = [self._state[p] for p in ps]
        for st in states:
            st[0] += 1
        b1, b2 = self.betas
        m = [st[1] for st in states]
        v = [st[2] for st in states]
        grads = [p.grad for p in ps]
        with torch.no_grad():
            torch._foreach_lerp_(m, grads, 1.0 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, value=1.0 - b2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, [math.sqrt(1.0 - b2 ** st[0]) for st in states])
            torch._foreach_add_(denom, self.eps)
            steps = [-self.lr / (1.0 - b1 ** st[0]) for st in states]
            torch._foreach_addcdiv_(ps, m, denom, steps)


def _fused(lr, lr_decay, num_steps):
    return FusedAdam(lr, 1.0 if lr_decay is None else float(lr_decay) ** (1.0 / num_steps))


def _torch(lr, lr_decay, num_steps):
    return Adam(lr, 1.0 if lr_decay is None else float(lr_decay) ** (1.0 / num_steps))


def _per_step(model: str, guide: str, steps: int, factory) -> float:
    loop.make_optimizer = factory
    r = vimodels.fit(
        model,
        guide=guide,
        num_steps=steps,
        seed=0,
        progress=False,
        num_eval=10,
        convergence=vimodels.ConvergenceRule(early_stop=False),
    )
    return r.wall_time / r.num_steps


def run(steps: int = 2000, repeats: int = 3) -> list[dict]:
    original = loop.make_optimizer
    rows = []
    try:
        for model, guide in CASES:
            _per_step(model, guide, 1000, _torch)  # warm the compiled-graph cache
            t_fused, t_torch = [], []
            for _ in range(repeats):
                t_fused.append(_per_step(model, guide, steps, _fused))
                t_torch.append(_per_step(model, guide, steps, _torch))
            f, t = statistics.median(t_fused), statistics.median(t_torch)
            rows.append(
                {
                    "case": f"{model}/{guide}",
                    "fused_ms": round(f * 1e3, 3),
                    "torch_ms": round(t * 1e3, 3),
                    "ratio_torch_over_fused": round(t / f, 3),
                }
            )
            print(rows[-1], flush=True)
    finally:
        loop.make_optimizer = original
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run(args.steps, args.repeats)


if __name__ == "__main__":
    main()
