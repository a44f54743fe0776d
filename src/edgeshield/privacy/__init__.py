"""Differential privacy building blocks: vetted noise, mechanisms, accountants and a budget ledger that fails closed.

- :func:`gaussian_noise`, :func:`laplace_noise`, :func:`discrete_gaussian_noise`: the only noise sources, OpenDP's
  samplers (exact discrete sampling on a grid, random bits from OpenSSL; safe against the floating-point attack on
  textbook samplers). ``np.random`` is never used for privacy noise, and a test fails if it is.
- :class:`LaplaceMechanism` (L1) and :class:`GaussianMechanism` (L2, with :meth:`GaussianMechanism.calibrated` and
  :func:`analytic_gaussian_sigma`, the analytic Gaussian mechanism of Balle & Wang 2018).
- :func:`epsilon_for` / :func:`noise_multiplier_for` / :func:`history_epsilon`: subsampled Gaussian rounds (Google's
  ``dp-accounting``) under one of :data:`SAMPLINGS`: "poisson" (add/remove-one; RDP and PLD side by side) or "fixed"
  (exactly m of N without replacement, replace-one; RDP only, the PLD figure is ``None``).
- :class:`PrivacyLedger`: per-client budgets in SQLite; :class:`BudgetExceededError` before any release over budget.

Needs the ``privacy`` extra (``pip install edgeshield[privacy]``); OpenDP and dp-accounting load on first use.
"""

from __future__ import annotations

from edgeshield.privacy._accounting import (
    SAMPLINGS,
    EpsilonReport,
    epsilon_for,
    history_epsilon,
    noise_multiplier_for,
)
from edgeshield.privacy._errors import BudgetExceededError, LedgerMismatchError, NotAPrivacyLedgerError, PrivacyError
from edgeshield.privacy._ledger import PrivacyLedger
from edgeshield.privacy._mechanisms import (
    GaussianMechanism,
    LaplaceMechanism,
    analytic_gaussian_delta,
    analytic_gaussian_epsilon,
    analytic_gaussian_sigma,
    classical_gaussian_sigma,
)
from edgeshield.privacy._noise import discrete_gaussian_noise, gaussian_noise, laplace_noise

__all__ = [
    "SAMPLINGS", "BudgetExceededError", "EpsilonReport", "GaussianMechanism", "LaplaceMechanism", "LedgerMismatchError",
    "NotAPrivacyLedgerError", "PrivacyError", "PrivacyLedger", "analytic_gaussian_delta", "analytic_gaussian_epsilon",
    "analytic_gaussian_sigma", "classical_gaussian_sigma", "discrete_gaussian_noise", "epsilon_for",
    "gaussian_noise", "history_epsilon", "laplace_noise", "noise_multiplier_for",
]
