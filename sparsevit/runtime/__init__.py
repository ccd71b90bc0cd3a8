"""Runtime: module swapping, sparse modules and per-layer kernel choice (see ``accelerate``)."""
from sparsevit.runtime.accelerate import accelerate  # noqa: F401
from sparsevit.runtime.report import LayerDecision, Report  # noqa: F401
