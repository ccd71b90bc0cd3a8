"""Model adapters: the one place that knows timm's attribute names.

``get_adapter(model)`` returns the adapter for a supported timm model; ``masked_model(model, plan)``
returns the *masked dense model*, a copy whose removed weights are zero: the reference every
accelerated model is checked against.
"""
import copy

from torch import nn

from sparsevit.errors import UnsupportedModelError
from sparsevit.models.base import BlockInfo, ModelAdapter, ResolvedBlock, unsupported  # noqa: F401
from sparsevit.models.coupling import (AttentionValues, Coupled, MlpValues, WindowValues,  # noqa: F401
                                       activation_kind)
from sparsevit.models.masking import MaskedLayerNorm  # noqa: F401
from sparsevit.plan import register_adapter_lookup

SUPPORTED = ("timm VisionTransformer (ViT, DeiT, DeiT distilled, DeiT-3), timm Beit, timm SwinTransformer "
             "(each with timm Attention/WindowAttention and Mlp blocks)")


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``; raises :class:`UnsupportedModelError` listing what is supported."""
    if not isinstance(model, nn.Module):
        raise unsupported(model, SUPPORTED)
    name = type(model).__name__
    mod = type(model).__module__
    if getattr(model, "_sparsevit_accelerated", False):
        raise UnsupportedModelError("this model was already accelerated by sparsevit; pass the original "
                                    "timm model (or the masked dense model) instead.")
    if name in ("VisionTransformer", "VisionTransformerDistilled") and mod.startswith("timm."):
        from sparsevit.models.vit import ViTAdapter

        return ViTAdapter(model)
    if name == "Beit" and mod.startswith("timm."):
        from sparsevit.models.vit import BeitAdapter

        return BeitAdapter(model)
    if name == "SwinTransformer" and mod.startswith("timm."):
        from sparsevit.models.swin import SwinAdapter

        return SwinAdapter(model)
    raise unsupported(model, SUPPORTED)


def masked_model(model: nn.Module, plan, *, inplace: bool = False) -> nn.Module:
    """Apply ``plan`` by zeroing what it removes (and masking residual-channel norms).

    The result computes exactly what the accelerated model computes, at full size. Fine-tuning under
    a plan trains this model; ``accelerate(masked)`` (no plan) or ``accelerate(model, plan)`` then
    gives the fast one.
    """
    target = model if inplace else copy.deepcopy(model)
    adapter = get_adapter(target)
    adapter.validate_plan(plan)
    adapter.apply_masks(plan)
    return target


def summary(model: nn.Module, plan, *, as_dict: bool = False):
    """Exact parameters and MACs per image of ``model`` before and after ``plan``, per block and in
    total, as a table (``as_dict=True``: the statistics). Stores them in ``plan.meta["stats"]``."""
    return get_adapter(model).summary(plan, as_dict=as_dict)


register_adapter_lookup(get_adapter)
