"""Exceptions with messages that name the problem and the fix."""


class SparseVitError(Exception):
    """Base class of every error sparsevit raises on purpose."""


class PlanError(SparseVitError, ValueError):
    """A plan is malformed, corrupt, or does not fit the model it is applied to."""


class UnsupportedModelError(SparseVitError, TypeError):
    """The model (or one of its modules) is not a kind sparsevit knows how to read or slice."""


class KernelError(SparseVitError, RuntimeError):
    """A kernel was asked for inputs it cannot take (wrong dtype/device/shape, or not built)."""


class CheckpointError(SparseVitError, IOError):
    """A saved sparsevit model is corrupt, from a newer version, or not a sparsevit file."""


class VerificationError(SparseVitError, RuntimeError):
    """``accelerate(..., verify=True)`` built a model that does not compute what the masked dense model
    computes on a random probe: a sparsevit bug or a model feature it missed. Never returned silently."""
