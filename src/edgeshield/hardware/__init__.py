"""Hardware root of trust: what the device really has (``probe``), TPM-sealed device keys, attestation.

Importable without extras: the TPM parts import ``tpm2_pytss`` (extra ``edgeshield[tpm]``) only when used.
"""
