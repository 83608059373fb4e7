"""Privacy accounting for DP-SGD with Poisson sampling, on Opacus' accountants.

PRV (Gopi et al. 2021; numerically tight, the default) or RDP (Mironov 2017; a looser upper bound).
The accountant's history is a list of ``(noise_multiplier, sample_rate, steps)`` triples, so it is
JSON state that a checkpoint carries and a resumed run continues.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from slimtune.errors import SlimtuneError

ACCOUNTANTS = {"prv": PRVAccountant, "rdp": RDPAccountant}


def make_accountant(kind: str, history: list[Any] | None = None):
    if kind not in ACCOUNTANTS:
        raise SlimtuneError(f"privacy.accountant: '{kind}' is not one of {sorted(ACCOUNTANTS)}")
    accountant = ACCOUNTANTS[kind]()
    accountant.history = [tuple(entry) for entry in (history or [])]
    return accountant


def _quiet(fn, *args, **kwargs):
    # Opacus' RDP analysis warns when the best order is the largest it tries; the bound is
    # still valid (just not the tightest), which is what we report.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        # PRV at sampling rate 1 (a full-batch step, e.g. the linear probe) takes log(0) on the
        # way to a finite answer.
        with np.errstate(divide="ignore"):
            return fn(*args, **kwargs)


def epsilon_of(kind: str, history: list[Any], delta: float) -> float:
    """ε spent by a history of ``(noise_multiplier, sample_rate, steps)`` (an upper bound for PRV)."""
    return _epsilon_cached(kind, tuple((float(s), float(q), int(n)) for s, q, n in history if n > 0), float(delta))


@functools.lru_cache(maxsize=256)
def _epsilon_cached(kind: str, history: tuple, delta: float) -> float:
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf
    return float(_quiet(make_accountant(kind, list(history)).get_epsilon, delta=delta))


def epsilon_for(kind: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    return epsilon_of(kind, [(noise_multiplier, sample_rate, steps)], delta)


def calibrate_noise(kind: str, epsilon: float, delta: float, sample_rate: float, steps: int, prior: list[Any] | None = None) -> float:
    """The noise multiplier that spends at most ``epsilon`` in ``steps`` steps (never more), after
    the already-planned ``prior`` history (e.g. a DP linear probe) if any.

    Opacus' binary search returns a σ whose ε is below the target; we check it with the same
    accountant and, with a prior history or in the (numerically possible) case that it does not
    fit, search upwards from it (the composed ε only falls as σ grows).
    """
    if steps < 1:
        raise SlimtuneError("privacy: no training steps planned; nothing to calibrate")
    prior = [tuple(entry) for entry in (prior or [])]
    if prior and epsilon_of(kind, prior, delta) >= epsilon:
        raise SlimtuneError(f"privacy.epsilon: {epsilon} leaves nothing for training after the linear probe (which alone spends {epsilon_of(kind, prior, delta):.3g}); lower privacy.linear_probe.epsilon")
    try:
        sigma = float(_quiet(get_noise_multiplier, target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant=kind, epsilon_tolerance=0.01))
    except ValueError as exc:
        raise SlimtuneError(f"privacy.epsilon: {epsilon} is out of reach with δ={delta}, sampling rate {sample_rate:.4g} and {steps} steps ({exc})") from None

    def fits(value: float) -> bool:
        return epsilon_of(kind, [*prior, (value, sample_rate, steps)], delta) <= epsilon

    if fits(sigma):
        return sigma
    low, high = sigma, sigma * 1.01
    for _ in range(200):
        if fits(high):
            break
        low, high = high, high * 1.25
    else:
        raise SlimtuneError(f"privacy.epsilon: could not calibrate the noise to ε={epsilon}")
    while high / low > 1.001:  # the smallest fitting σ to 0.1%
        mid = (low * high) ** 0.5
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


def max_steps_within(kind: str, history: list[Any], noise_multiplier: float, sample_rate: float, delta: float, epsilon: float, limit: int) -> int:
    """How many more steps of ``(noise_multiplier, sample_rate)`` keep the total ε within budget
    (searched up to ``limit``; each probe is one accountant evaluation)."""
    if noise_multiplier <= 0:
        return 0

    def fits(extra: int) -> bool:
        return epsilon_of(kind, [*history, (noise_multiplier, sample_rate, extra)], delta) <= epsilon

    if epsilon_of(kind, history, delta) > epsilon or not fits(1):
        return 0
    if fits(limit):
        return limit
    low, high = 1, limit  # fits(low), not fits(high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
