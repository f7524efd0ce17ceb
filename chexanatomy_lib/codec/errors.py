"""Errors raised by the token codec."""


class CodecError(ValueError):
    """Bad input to the codec (empty mask, wrong shape or range)."""


class CheckpointError(CodecError):
    """A VQ-VAE checkpoint that cannot be used: the message names the file and the problem."""
