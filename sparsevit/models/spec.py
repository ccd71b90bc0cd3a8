"""Architecture specs: how to rebuild a timm model's module tree from plain data (no pickle).

A spec is JSON-able: the timm architecture name (``timm.create_model`` entry point) plus the
constructor keyword arguments that reproduce the model, derived from the model's own attributes
(the entry point's defaults are overridden by them, so a model created with extra kwargs comes back
as created). ``sparsevit.save`` stores it; ``sparsevit.load`` rebuilds from it (random init, no
download) and loads the weights.

The spec also carries what the rebuild is checked against (fail closed):

* ``state``:   the original model's state_dict keys and shapes (checked at save and at load time);
* ``modules``: per module, its class and simple configuration attributes (eps, approximate, heads,
  window sizes, ...), kept in memory only and checked at save time, so a model feature the derived
  kwargs miss (a norm class, an activation) is named instead of silently rebuilt differently.

Callable constructor arguments (``norm_layer``, ``act_layer``) are stored as names resolved through
the whitelists below, never by importing a name from a file.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, List, Optional

import torch
from torch import nn

__all__ = ["architecture_spec", "build_from_spec", "spec_differences", "module_config"]

# Attributes that describe the runtime environment or training state, not the architecture.
_IGNORED_ATTRS = {"training", "fused_attn", "grad_checkpointing", "pretrained_cfg", "default_cfg",
                  "pretrained_model_args", "feature_info", "weight_init_mode", "inplace"}
_ACT_NAMES = ("gelu", "gelu_tanh", "quick_gelu", "silu", "swish", "relu", "tanh", "sigmoid", "hard_swish",
              "mish", "relu6", "leaky_relu", "elu", "celu", "selu", "hard_sigmoid", "prelu")


def timm_version() -> str:
    """The installed timm's version (recorded in saved files: timm builds the modules on load)."""
    import timm

    return timm.__version__


def _norm_classes() -> Dict[str, type]:
    from timm.layers import LayerNorm as TimmLayerNorm

    classes = {"torch.nn.LayerNorm": nn.LayerNorm, "timm.layers.LayerNorm": TimmLayerNorm}
    try:
        from timm.layers import RmsNorm

        classes["timm.layers.RmsNorm"] = RmsNorm
    except ImportError:  # older timm
        pass
    return classes


def _norm_spec(norm: Optional[nn.Module]) -> Optional[dict]:
    """``{"class": whitelisted name, "eps": ...}`` for a norm module, or None if it is not one we know."""
    if norm is None or isinstance(norm, nn.Identity):
        return None
    for name, cls in _norm_classes().items():
        if type(norm) is cls:
            return {"class": name, "eps": float(norm.eps)}
    return None


def _act_name(act: nn.Module) -> Optional[str]:
    """The timm ``act_layer`` name that recreates ``act`` (same class and settings), if any."""
    from timm.layers import get_act_layer

    for name in _ACT_NAMES:
        try:
            made = get_act_layer(name)()
        except Exception:  # a name this timm version does not know
            continue
        if type(made) is type(act) and module_config(made) == module_config(act):
            return name
    return None


def _first(model: nn.Module, attr: str) -> Optional[nn.Module]:
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] == attr:
            return m
    return None


def _not_identity(m) -> bool:
    return m is not None and not isinstance(m, nn.Identity)


def _pair(v):
    return [int(x) for x in v] if isinstance(v, (tuple, list)) else int(v)


def _common_kwargs(model: nn.Module) -> dict:
    pe = model.patch_embed
    kw = {"img_size": _pair(pe.img_size), "patch_size": _pair(pe.patch_size),
          "in_chans": int(pe.proj.in_channels), "num_classes": int(model.num_classes),
          "global_pool": model.global_pool if isinstance(model.global_pool, str) else None,
          "embed_dim": int(model.embed_dim)}
    fc1 = _first(model, "fc1")
    if fc1 is not None:
        kw["mlp_ratio"] = fc1.out_features / _first(model, "norm1").normalized_shape[0]
    act = _first(model, "act")
    if act is not None and not isinstance(model, _swin_cls()):
        kw["act_layer"] = _act_name(act)
    norm = _norm_spec(_first(model, "norm1")) or _norm_spec(_first(model, "norm"))
    if norm is not None:
        kw["norm_layer"] = norm
    return {k: v for k, v in kw.items() if v is not None}


def _swin_cls():
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer


def _vit_kwargs(model) -> dict:
    b = model.blocks[0]
    ls = getattr(b, "ls1", None)
    kw = _common_kwargs(model)
    kw.update(depth=len(model.blocks), num_heads=int(b.attn.num_heads), qkv_bias=b.attn.qkv.bias is not None,
              qk_norm=_not_identity(getattr(b.attn, "q_norm", None)),
              scale_attn_norm=_not_identity(getattr(b.attn, "norm", None)),
              scale_mlp_norm=_not_identity(getattr(b.mlp, "norm", None)),
              proj_bias=b.attn.proj.bias is not None,
              init_values=float(ls.gamma.detach().flatten()[0]) if _not_identity(ls) else None,
              class_token=model.cls_token is not None, pos_embed="learn" if model.pos_embed is not None else "none",
              no_embed_class=bool(model.no_embed_class), reg_tokens=int(model.num_reg_tokens),
              pre_norm=_not_identity(model.norm_pre),
              final_norm=_not_identity(model.norm) or _not_identity(model.fc_norm),
              fc_norm=_not_identity(model.fc_norm), pool_include_prefix=bool(model.pool_include_prefix),
              dynamic_img_size=bool(model.dynamic_img_size), dynamic_img_pad=bool(model.patch_embed.dynamic_img_pad))
    return kw


def _beit_kwargs(model) -> dict:
    b = model.blocks[0]
    kw = _common_kwargs(model)
    kw.pop("act_layer", None)  # Beit takes no act_layer (always GELU)
    kw.update(depth=len(model.blocks), num_heads=int(b.attn.num_heads), qkv_bias=b.attn.q_bias is not None,
              scale_mlp=_not_identity(getattr(b.mlp, "norm", None)),
              init_values=float(b.gamma_1.detach().flatten()[0]) if getattr(b, "gamma_1", None) is not None else None,
              use_abs_pos_emb=model.pos_embed is not None,
              use_rel_pos_bias=getattr(b.attn, "relative_position_bias_table", None) is not None,
              use_shared_rel_pos_bias=model.rel_pos_bias is not None,
              use_fc_norm=_not_identity(model.fc_norm))
    return kw


def _swin_kwargs(model) -> dict:
    b = model.layers[0].blocks[0]
    kw = _common_kwargs(model)
    kw.update(depths=[len(layer.blocks) for layer in model.layers],
              num_heads=[int(layer.blocks[0].attn.num_heads) for layer in model.layers],
              head_dim=_swin_head_dim(model),
              window_size=_pair(b.window_size), always_partition=bool(b.always_partition),
              strict_img_size=bool(model.patch_embed.strict_img_size), dynamic_img_size=bool(model.dynamic_img_size),
              qkv_bias=b.attn.qkv.bias is not None)
    return kw


def _swin_head_dim(model) -> Optional[int]:
    """None when every stage uses dim // heads (timm's default), else the explicit head dim."""
    dims = {int(layer.blocks[0].attn.qkv.out_features // 3 // layer.blocks[0].attn.num_heads) for layer in model.layers}
    default = all(layer.blocks[0].attn.qkv.in_features // layer.blocks[0].attn.num_heads ==
                  layer.blocks[0].attn.qkv.out_features // 3 // layer.blocks[0].attn.num_heads for layer in model.layers)
    return None if default or len(dims) != 1 else dims.pop()


def _family_kwargs(model: nn.Module) -> dict:
    from timm.models.beit import Beit
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return _vit_kwargs(model)
    if isinstance(model, Beit):
        return _beit_kwargs(model)
    if isinstance(model, _swin_cls()):
        return {k: v for k, v in _swin_kwargs(model).items() if v is not None}
    raise ValueError(f"{type(model).__name__} is not a timm VisionTransformer, Beit or SwinTransformer")


def architecture_spec(model: nn.Module) -> dict:
    """A JSON-able description of ``model``'s architecture (see the module docstring).

    Never raises: when the architecture cannot be described, the spec carries ``"error"`` and
    ``sparsevit.save`` asks for ``architecture=`` / ``model_kwargs=`` explicitly.
    """
    spec = {"architecture": None, "kwargs": None,
            "state": state_shapes(model),
            "modules": module_config_tree(model)}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    spec["architecture"] = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not spec["architecture"]:
        spec["error"] = f"{type(model).__name__} has no timm pretrained_cfg['architecture'] (not from timm.create_model?)"
        return spec
    try:
        spec["kwargs"] = _family_kwargs(model)
    except Exception as exc:  # an attribute layout this derivation does not know
        spec["error"] = f"cannot derive the constructor arguments of {type(model).__name__}: {exc}"
    return spec


def _resolve_kwargs(kwargs: dict) -> dict:
    """JSON kwargs -> constructor kwargs (norm_layer from the whitelist, lists to tuples)."""
    out = {}
    for k, v in kwargs.items():
        if k == "norm_layer" and isinstance(v, dict):
            classes = _norm_classes()
            if v.get("class") not in classes:
                raise ValueError(f"norm_layer class {v.get('class')!r} is not one of {sorted(classes)}")
            v = partial(classes[v["class"]], eps=float(v["eps"]))
        elif isinstance(v, list):
            v = tuple(v)
        out[k] = v
    return out


def build_from_spec(spec: dict) -> nn.Module:
    """The timm model ``spec`` describes, randomly initialised (no download), in eval mode.

    Raises ValueError naming the problem when timm cannot build it.
    """
    import timm

    name, kwargs = spec.get("architecture"), spec.get("kwargs")
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        raise ValueError(spec.get("error") or "the spec has no architecture name and kwargs")
    if not timm.is_model(name):
        raise ValueError(f"timm {timm.__version__} has no model '{name}'")
    try:
        model = timm.create_model(name, pretrained=False, **_resolve_kwargs(kwargs))
    except Exception as exc:
        raise ValueError(f"timm.create_model('{name}', **{kwargs}) failed: {type(exc).__name__}: {exc}") from None
    return model.eval()


# ----------------------------------------------------------------------------------- checks
def module_config(m: nn.Module) -> dict:
    """Class and simple configuration attributes of one module (what decides its computation).

    LayerNorms (torch's, timm's, and sparsevit's MaskedLayerNorm of a masked model, which normalises
    the kept channels of the same norm) compare by ``normalized_shape`` and ``eps`` only.
    """
    from sparsevit.models.masking import MaskedLayerNorm

    if isinstance(m, (nn.LayerNorm, MaskedLayerNorm)):
        return {"class": "LayerNorm", "attrs": {"normalized_shape": [int(v) for v in m.normalized_shape],
                                                "eps": float(m.eps)}}
    attrs = {}
    for k, v in vars(m).items():
        if k.startswith("_") or k in _IGNORED_ATTRS:
            continue
        if isinstance(v, str):  # str enums (timm's Format) compare by value
            attrs[k] = str(v.value) if hasattr(v, "value") else v
        elif isinstance(v, (bool, int, float)) or v is None:
            attrs[k] = v
        elif isinstance(v, (tuple, list)) and all(isinstance(x, (bool, int, float, str)) for x in v):
            attrs[k] = list(v)
    cls = type(m)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "attrs": attrs}


def module_config_tree(model: nn.Module) -> Dict[str, dict]:
    return {name: module_config(m) for name, m in model.named_modules()}


def spec_differences(spec: dict, rebuilt: nn.Module, limit: int = 5) -> List[str]:
    """What differs between the model ``spec`` was taken from and ``rebuilt`` (empty when nothing)."""
    diffs = []
    state = state_shapes(rebuilt)
    want = spec.get("state")
    if want is not None:
        for k in sorted(set(want) | set(state)):
            if k not in state:
                diffs.append(f"state '{k}' missing in the rebuilt model")
            elif k not in want:
                diffs.append(f"state '{k}' not in the original model")
            elif list(want[k]) != state[k]:
                diffs.append(f"state '{k}' has shape {state[k]}, the original {list(want[k])}")
    want_modules = spec.get("modules")
    if want_modules is not None:
        have = module_config_tree(rebuilt)
        for k in want_modules:
            if k not in have:
                diffs.append(f"module '{k}' ({want_modules[k]['class']}) missing in the rebuilt model")
            elif have[k] != want_modules[k]:
                diffs.append(f"module '{k or '<root>'}': rebuilt {_describe(have[k], want_modules[k])}")
        diffs += [f"module '{k}' ({have[k]['class']}) not in the original model" for k in have if k not in want_modules]
    return diffs[:limit] + ([f"... and {len(diffs) - limit} more"] if len(diffs) > limit else [])


def _describe(have: dict, want: dict) -> str:
    if have["class"] != want["class"]:
        return f"{have['class']}, original {want['class']}"
    keys = sorted(set(have["attrs"]) | set(want["attrs"]))
    return ", ".join(f"{k}={have['attrs'].get(k)!r} (original {want['attrs'].get(k)!r})"
                     for k in keys if have["attrs"].get(k) != want["attrs"].get(k))


def state_shapes(model: nn.Module) -> Dict[str, list]:
    """state_dict keys and shapes, without the ``keep`` index buffers masking adds to norms."""
    from sparsevit.models.masking import MaskedLayerNorm

    masked = {f"{n}.keep" if n else "keep" for n, m in model.named_modules() if isinstance(m, MaskedLayerNorm)}
    return {k: list(v.shape) for k, v in model.state_dict().items() if k not in masked}


def probe_input(spec: dict, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A random input of the size the spec's model takes."""
    kw = spec.get("kwargs") or {}
    size = kw.get("img_size", 224)
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, int(kw.get("in_chans", 3)), int(h), int(w), generator=g)
