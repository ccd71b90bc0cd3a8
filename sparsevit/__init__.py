"""sparsevit: prune timm Vision Transformers and serve them on sparse CPU/GPU kernels.

Public API::

    plan = sparsevit.prune(model, method="grouped", criterion="taylor", sparsity=0.5, data=loader)
    plan.save("plan.json"); plan = sparsevit.SparsityPlan.load("plan.json")
    fast = sparsevit.accelerate(model, plan)        # or accelerate(masked_model)
    fast.sparsevit_report                           # per layer: format, kernel, why
    print(sparsevit.summary(model, plan))           # exact params / MACs before and after
    sparsevit.save(fast, "model.sparsevit"); fast = sparsevit.load("model.sparsevit")
"""
from sparsevit.errors import (CheckpointError, KernelError, PlanError, SparseVitError,  # noqa: F401
                              UnsupportedModelError, VerificationError)
from sparsevit.plan import BlockPlan, SparsityPlan  # noqa: F401
from sparsevit.models import get_adapter, masked_model, summary  # noqa: F401
from sparsevit.runtime.accelerate import accelerate  # noqa: F401
# `sparsevit.prune` is the pruning subpackage and, being a callable package, also the entry point
# `sparsevit.prune(model, method=..., ...)` (see sparsevit/prune/__init__.py).
from sparsevit import prune  # noqa: E402,F401
from sparsevit.prune import finetune  # noqa: E402,F401

__version__ = "0.1.0"


def __getattr__(name):
    # Heavier entry points load lazily so `import sparsevit` stays fast and never needs triton.
    if name in ("save", "load", "export"):
        from sparsevit import serialize

        return getattr(serialize, name)
    if name in ("ops", "formats", "kernels"):
        import importlib

        return importlib.import_module(f"sparsevit.{name}")
    raise AttributeError(f"module 'sparsevit' has no attribute '{name}'")
