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
from edgeshield.hardware._swtpm import SoftwareTPM, SoftwareTPMError
from edgeshield.hardware._tpm import (
    PCRSelection,
    PolicyApproval,
    SealedObject,
    TPMApprovalError,
    TPMError,
    TPMPolicyError,
    TPMSealedObjectError,
    TPMUnavailableError,
    connect,
    load_approvals,
    load_device_key,
    pcr_extend,
    pcr_read,
    save_approvals,
    seal_device_key,
    sign_approval,
    unseal_device_key,
)

__all__ = [
    "FEATURES", "Evidence", "Finding", "ListeningSocket", "PCRSelection", "PolicyApproval", "ProbeReport",
    "SealedObject", "SocketOwner", "SoftwareTPM", "SoftwareTPMError", "Status", "TPMApprovalError", "TPMError",
    "TPMPolicyError", "TPMSealedObjectError", "TPMUnavailableError", "connect", "load_approvals", "load_device_key",
    "pcr_extend", "pcr_read", "probe", "save_approvals", "seal_device_key", "sign_approval", "unseal_device_key",
]
