"""Hardware root of trust: what the device really has (``probe``), TPM-sealed device keys, attestation.

Importable without extras: the TPM parts import ``tpm2_pytss`` (extra ``edgeshield[tpm]``) only when used.
"""

from edgeshield.hardware._probe import (
    FEATURES,
    Evidence,
    Finding,
    ListeningSocket,
    ProbeReport,
    SocketOwner,
    Status,
    probe,
)

__all__ = ["FEATURES", "Evidence", "Finding", "ListeningSocket", "ProbeReport", "SocketOwner", "Status", "probe"]
