"""The tolerance of a value made by cancellation: a reward is beta times a difference of two summed f32
log-probs of hundreds of nats each, so rounding the sums by a fraction of their ulp (a different summation
order: another layout, mesh, microbatching, process count or CPU) moves a small reward by far more than
1e-5 of itself. Its error is bounded by the ulps of what it is made of, not by its own size."""

import numpy as np
import pytest

F32_EPS = float(np.finfo(np.float32).eps)
ULPS = 4  # seen: up to 0.2 ulp between two layouts (AMD EPYC, XLA CPU, #26); 4 leaves room for other CPUs
# Metrics that are differences of summed log-probs (the loss too: each compared loss is sigmoid-shaped in
# beta * log-ratio, slope at most 1, so its error is at most its rewards' times the number of such losses).
CANCELLING = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins")


def rounding_floor(metrics: dict, beta: float, prefix: str = "") -> float:
    """ULPS f32 ulps of every summed log-prob behind a reward (policy and reference, chosen and rejected;
    the reference's are of the policy's size), times beta: the absolute error rounding alone can leave."""
    logps = abs(metrics[f"{prefix}logps/chosen"]) + abs(metrics[f"{prefix}logps/rejected"])
    return ULPS * F32_EPS * beta * 2 * float(logps)


def assert_metrics_close(got: dict, want: dict, keys, beta: float, rel=1e-5, atol=0.0, losses=1) -> None:
    """got[key] == want[key] to `rel` (or `atol`), and a cancelling key (CANCELLING, also as eval/KEY) to
    the rounding floor of the log-probs it is made from (the loss: times `losses`, the sigmoid-shaped losses
    summed). Other keys (log-probs, entropy, grad_norm: sums without cancellation) keep `rel` and `atol`."""
    for key in keys:
        prefix = "eval/" if key.startswith("eval/") else ""
        name = key.removeprefix(prefix)
        floor = rounding_floor(want, beta, prefix) * (losses if name == "loss" else 1)
        tolerance = max(atol, floor) if name in CANCELLING else atol
        assert float(got[key]) == pytest.approx(float(want[key]), rel=rel, abs=tolerance), key
