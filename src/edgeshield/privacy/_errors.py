"""The privacy package's failures: one base, so a caller can catch every refusal to release."""

from __future__ import annotations

from edgeshield.errors import InputError


class PrivacyError(InputError):
    """A differentially private release was refused, or its bookkeeping cannot be trusted."""


class BudgetExceededError(PrivacyError):
    """The release would take ``client`` past its privacy budget: ``epsilon`` is what it would reach (the
    accountant's figure at the ledger's delta), ``budget`` what it may spend. Raised before anything is released."""

    def __init__(self, client: str, epsilon: float, budget: float, delta: float) -> None:
        super().__init__(f"privacy budget exceeded for {client!r}: this release would reach epsilon {epsilon:.4g} "
                         f"(delta {delta:g}), the budget is {budget:g}; nothing was released")
        self.client = client
        self.epsilon = epsilon
        self.budget = budget
        self.delta = delta


class NotAPrivacyLedgerError(PrivacyError):
    """The file is not an EdgeShield privacy ledger database."""


class LedgerMismatchError(PrivacyError):
    """A ledger was opened with another budget or delta than it was created with (its history was charged
    against those: changing them would rewrite what every client has agreed to spend)."""
