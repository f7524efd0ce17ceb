"""Errors raised by the token codec."""

from ..checkpoints import CheckpointError  # noqa: F401  (a VQ-VAE file that cannot be used)


class CodecError(ValueError):
    """Bad input to the codec (empty mask, wrong shape or range)."""
