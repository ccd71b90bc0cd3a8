"""Autocast rules for sparsevit's custom ops, so they take part in ``torch.autocast`` the way the
aten ops they replace do (a custom op is otherwise called with whatever dtypes arrive, and the
accelerated model would then fail on dtype mismatches that the timm model never sees).

Policies, named after autocast's own op lists:

* ``"lower"``   floating inputs (except float64) cast to the autocast dtype, like ``F.linear`` / SDPA;
* ``"fp32"``    floating inputs cast to float32, like ``layer_norm``;
* ``"promote"`` floating inputs cast to the widest floating dtype among them, like ``add``;
* ``"first"``   floating inputs cast to the first argument's dtype (in-place ops: their output is
  the first argument, which must keep its dtype).
"""
from typing import Sequence

import torch

_LIBS = []  # registrations live as long as their Library object


def _target_dtype(args, device_type: str, policy: str):
    floats = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if policy == "lower":
        return torch.get_autocast_dtype(device_type)
    if policy == "fp32":
        return torch.float32
    if policy == "first":
        return floats[0].dtype if floats else None
    out = None
    for t in floats:
        out = t.dtype if out is None else torch.promote_types(out, t.dtype)
    return out


def _cast(args, device_type: str, policy: str):
    dtype = _target_dtype(args, device_type, policy)
    if dtype is None:
        return args

    def cast(a):
        if (isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != dtype
                and a.device.type == device_type and not (policy == "lower" and a.dtype == torch.float64)):
            return a.to(dtype)
        return a

    return tuple(cast(a) for a in args)


def register_autocast(qualname: str, policy: str, device_types: Sequence[str] = ("cpu", "cuda")) -> None:
    """Registers ``policy`` as the Autocast{CPU,CUDA} kernel of custom op ``qualname`` ("ns::name")."""
    if policy not in ("lower", "fp32", "promote", "first"):
        raise ValueError(f"unknown autocast policy {policy!r}")
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    lib = torch.library.Library(namespace, "IMPL")
    _LIBS.append(lib)
    for device_type in device_types:
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(*args, _device_type=device_type, _keyset=keyset):
            with torch._C._ExcludeDispatchKeyGuard(_keyset):
                return op(*_cast(args, _device_type, policy))

        lib.impl(name, kernel, key)
