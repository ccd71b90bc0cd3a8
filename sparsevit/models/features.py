"""Fail closed: what an adapter accepts inside a block, and which activations slice exactly.

An adapter reads a timm block through the coupling table; anything the table and the runtime do not
know about (a gate Linear, a new norm, an extra parameter, a patched ``forward``) would be silently
dropped by ``accelerate``. So every block, attention and MLP is checked against an allow-list: its
class (exact, no duck typing), its child modules, its own parameters and buffers, and the keyword
arguments of its ``forward``. Whatever is not on the list raises :class:`UnsupportedModelError`
naming the fqn and the type.

Activations are judged by what they compute, not by their class: slicing MLP hidden channels needs
an elementwise activation with ``act(0) == 0`` (a removed channel is an implicit zero both before
and after it), checked numerically on a few values.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from sparsevit.errors import UnsupportedModelError


def _inert(m: nn.Module) -> bool:
    """Children that compute nothing at inference (eval mode): accepted wherever they appear."""
    from timm.layers import DropPath

    return type(m) in (nn.Identity, nn.Dropout, DropPath)


@dataclass(frozen=True)
class Allowed:
    """What a module of one exact class may hold.

    children: child name -> the check that child must pass (``None``: checked by its own rule
              elsewhere, e.g. the attention inside a block); inert children are always accepted.
    params / buffers: names of the module's own parameters and buffers the adapter handles.
    forward_args: the keyword arguments its ``forward`` may take (beyond ``x``).
    """

    children: Dict[str, Optional[str]] = field(default_factory=dict)
    params: FrozenSet[str] = frozenset()
    buffers: FrozenSet[str] = frozenset()
    forward_args: FrozenSet[str] = frozenset()


def check_module(module: nn.Module, fqn: str, cls: type, allowed: Allowed) -> None:
    """Raise :class:`UnsupportedModelError` unless ``module`` is exactly ``cls`` holding only what
    ``allowed`` lists (see :class:`Allowed`)."""
    if type(module) is not cls:
        raise UnsupportedModelError(f"{fqn} is {_typename(module)}; sparsevit supports exactly "
                                    f"{_typename(cls)} there (subclasses and look-alikes may compute "
                                    "something else).")
    if "forward" in vars(module):
        raise UnsupportedModelError(f"{fqn} ({_typename(module)}) has a patched forward; sparsevit "
                                    "cannot know what it computes.")
    for name, child in module.named_children():
        if name not in allowed.children and not _inert(child):
            raise UnsupportedModelError(f"{fqn}.{name} ({_typename(child)}) is a submodule sparsevit does not "
                                        f"know; accelerating would drop it. Remove it or open an issue.")
        rule = allowed.children.get(name)
        if rule is not None and not isinstance(child, nn.Identity):
            _check_child(child, f"{fqn}.{name}", rule)
    for kind, names, known in (("parameter", module.named_parameters(recurse=False), allowed.params),
                               ("buffer", module.named_buffers(recurse=False), allowed.buffers)):
        for name, _ in names:
            if name not in known:
                raise UnsupportedModelError(f"{fqn}.{name} is a {kind} sparsevit does not know "
                                            f"({_typename(module)}); accelerating would drop it.")
    extra = set(inspect.signature(module.forward).parameters) - {"x", "input"} - set(allowed.forward_args)
    if extra:
        raise UnsupportedModelError(f"{fqn} ({_typename(module)}).forward takes {sorted(extra)}, which "
                                    "sparsevit does not pass on; this timm version's block is not supported.")


def _check_child(child: nn.Module, fqn: str, rule: str) -> None:
    if rule == "linear":
        if type(child) is not nn.Linear:
            raise UnsupportedModelError(f"{fqn} is {_typename(child)}; expected torch.nn.Linear.")
    elif rule == "layernorm":
        layernorm_or_refuse(child, fqn)
    elif rule == "residual_norm":  # a masked model's residual-subset norm is a LayerNorm too
        from sparsevit.models.masking import MaskedLayerNorm

        if not isinstance(child, MaskedLayerNorm):
            layernorm_or_refuse(child, fqn)
    elif rule == "layer_scale":
        from timm.layers import LayerScale

        check_module(child, fqn, LayerScale, Allowed(params=frozenset({"gamma"})))
    elif rule == "activation":
        pass  # judged by what it computes where channels are sliced (see ``activation_facts``)
    elif rule == "softmax":
        if type(child) is not nn.Softmax or child.dim != -1:
            raise UnsupportedModelError(f"{fqn} is {_typename(child)}; expected Softmax(dim=-1).")
    else:  # pragma: no cover - a typo in an allow-list
        raise AssertionError(f"unknown rule {rule!r}")


def layernorm_or_refuse(norm: nn.Module, fqn: str) -> None:
    """Accept torch's LayerNorm and timm's (same function); refuse RmsNorm and anything else."""
    from timm.layers import LayerNorm as TimmLayerNorm

    if type(norm) not in (nn.LayerNorm, TimmLayerNorm) or len(norm.normalized_shape) != 1:
        raise UnsupportedModelError(f"{fqn} is {_typename(norm)}; sparsevit supports LayerNorm over the last "
                                    "dim there.")


def _typename(obj) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


# ------------------------------------------------------------------------------------------ activations
_PROBE = (0.0, -3.1, -1.2, -0.4, -0.01, 0.0, 0.02, 0.37, 1.5, 4.2)


@dataclass(frozen=True)
class ActivationFacts:
    """What an MLP activation allows. ``sliceable``: elementwise with ``act(0) == 0``, so hidden
    channels can be removed; ``fused``: ``gelu`` / ``gelu_tanh`` when the sparse kernels can fuse it
    (the same function as ``F.gelu``), else None (it runs as its own module). ``why``: why not sliceable."""

    sliceable: bool
    fused: Optional[str]
    why: str = ""


def activation_facts(act: nn.Module) -> ActivationFacts:
    """Judge ``act`` numerically (float32, a few values, eval behaviour) rather than by class."""
    if any(True for _ in act.parameters()) or any(True for _ in act.buffers()):
        return ActivationFacts(False, None, f"{_typename(act)} has parameters or buffers")
    x = torch.tensor([_PROBE, _PROBE[::-1]], dtype=torch.float32)  # zeros at both ends and inside
    try:
        with torch.no_grad():
            y = act(x.clone())
            sub = act(x[:, 1:4].clone())
            perm = act(x.flip(-1))
    except Exception as exc:  # e.g. an activation tied to a width
        return ActivationFacts(False, None, f"{_typename(act)} failed on a probe: {exc}")
    if not (isinstance(y, torch.Tensor) and y.shape == x.shape and torch.isfinite(y).all()):
        return ActivationFacts(False, None, f"{_typename(act)} is not an elementwise map")
    if not (torch.equal(sub, y[:, 1:4]) and torch.equal(perm, y.flip(-1))):
        return ActivationFacts(False, None, f"{_typename(act)} is not elementwise (its channels interact)")
    zero_at = (x == 0)
    if not bool((y[zero_at] == 0).all()):
        return ActivationFacts(False, None, f"{_typename(act)} gives act(0) = {float(y[zero_at][0]):g}, not 0")
    return ActivationFacts(True, _fusable(act, x, y))


def _fusable(act: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Optional[str]:
    """``gelu`` / ``gelu_tanh`` for a known GELU class computing exactly that; else None."""
    from timm.layers import GELU as TimmGELU, GELUTanh

    kinds: Tuple[Tuple[type, str], ...] = ((TimmGELU, "gelu"), (GELUTanh, "gelu_tanh"))
    kind = None
    if type(act) is nn.GELU:
        kind = "gelu" if act.approximate == "none" else "gelu_tanh"
    for cls, name in kinds:
        if type(act) is cls:
            kind = name
    if kind is None:
        return None
    ref = F.gelu(x, approximate="none" if kind == "gelu" else "tanh")
    return kind if torch.equal(ref, y) else None


# ------------------------------------------------------------------------------------ allow-lists
_MLP = Allowed(children={"fc1": "linear", "act": "activation", "norm": "layernorm", "fc2": "linear"})


def check_mlp(mlp: nn.Module, fqn: str) -> None:
    """timm ``Mlp`` with Linear fc1/fc2 (no conv, GLU or SwiGLU variant), an optional hidden norm."""
    from timm.layers import Mlp

    check_module(mlp, fqn, Mlp, _MLP)


def check_vit_block(blk: nn.Module, fqn: str) -> None:
    """timm ``vision_transformer.Block`` with timm ``Attention`` (qk-norm / scale-norm allowed)."""
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block

    check_module(blk, fqn, Block, Allowed(
        children={"norm1": "residual_norm", "attn": None, "ls1": "layer_scale", "norm2": "residual_norm",
                  "mlp": None, "ls2": "layer_scale"}, forward_args=frozenset({"attn_mask", "is_causal"})))
    check_module(blk.attn, f"{fqn}.attn", Attention, Allowed(
        children={"qkv": "linear", "q_norm": "layernorm", "k_norm": "layernorm", "norm": "layernorm",
                  "proj": "linear"}, forward_args=frozenset({"attn_mask", "is_causal"})))
    check_mlp(blk.mlp, f"{fqn}.mlp")


def check_beit_block(blk: nn.Module, fqn: str) -> None:
    """timm ``beit.Block`` with ``beit.Attention`` (q/v biases, per-head rel-pos table)."""
    from timm.models.beit import Attention, Block

    check_module(blk, fqn, Block, Allowed(
        children={"norm1": "residual_norm", "attn": None, "norm2": "residual_norm", "mlp": None},
        params=frozenset({"gamma_1", "gamma_2"}), forward_args=frozenset({"shared_rel_pos_bias"})))
    check_module(blk.attn, f"{fqn}.attn", Attention, Allowed(
        children={"qkv": "linear", "proj": "linear"},
        params=frozenset({"q_bias", "v_bias", "relative_position_bias_table"}),
        buffers=frozenset({"k_bias", "relative_position_index"}), forward_args=frozenset({"shared_rel_pos_bias"})))
    check_mlp(blk.mlp, f"{fqn}.mlp")


def check_swin_block(blk: nn.Module, fqn: str) -> None:
    """timm ``SwinTransformerBlock`` with ``WindowAttention``."""
    from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention

    check_module(blk, fqn, SwinTransformerBlock, Allowed(
        children={"norm1": "residual_norm", "attn": None, "norm2": "residual_norm", "mlp": None},
        buffers=frozenset({"attn_mask"})))
    check_module(blk.attn, f"{fqn}.attn", WindowAttention, Allowed(
        children={"qkv": "linear", "proj": "linear", "softmax": "softmax"},
        params=frozenset({"relative_position_bias_table"}), buffers=frozenset({"relative_position_index"}),
        forward_args=frozenset({"mask"})))
    check_mlp(blk.mlp, f"{fqn}.mlp")


def check_top_level(model: nn.Module, children: FrozenSet[str], params: FrozenSet[str]) -> None:
    """The model's own children and parameters outside the blocks are ones the adapter knows."""
    for name, child in model.named_children():
        if name not in children and not _inert(child):
            raise UnsupportedModelError(f"{name} ({_typename(child)}) of {_typename(model)} is a module sparsevit "
                                        "does not know; accelerating could not account for it.")
    for name, _ in model.named_parameters(recurse=False):
        if name not in params:
            raise UnsupportedModelError(f"parameter '{name}' of {_typename(model)} is one sparsevit does not know.")
