"""``sparsevit::cpu_attention``: fused CPU attention for pruned heads, as a custom op.

``cpu_attention(q, k, v, attn_bias=None, scale=None)`` computes ``softmax(q k^T * scale + attn_bias) v``
for ``q``/``k`` ``[B, H, N, Dqk]`` and ``v`` ``[B, H, N, Dv]`` (``Dqk != Dv`` allowed, any head count,
head dims such as 16/24/40/48/64), with an additive float bias broadcastable to ``[B, H, N, N]``
(rel-pos bias, Swin masks). ``scale`` defaults to ``Dqk ** -0.5``; after head-dim pruning pass the
original head dim's scale.

* CPU, float32/bfloat16: ``torch.ops.sparsevit_C.attention_cpu`` (csrc/cpu/attention_cpu*.cpp: K^T,
  V and the queries packed once per (batch, head), each thread packing the head it takes next while
  it runs the current one, then per 12 queries register-tiled Q.K^T with keys in the
  vector lanes, an online fp32 softmax, and P @ V with channels in the lanes; bfloat16 runs both
  products on ``vdpbf16ps`` where the CPU has AVX512_BF16, else widens to fp32; AVX-512+BF16,
  AVX-512 or AVX2 chosen at run time, ``cpp_kernel_name()`` says which);
* everywhere else (and when :func:`not_supported_reasons` is non-empty): the reference, an fp32
  math implementation cast back to the input dtype;
* a fake implementation so it traces under ``torch.compile``. Inference only (no autograd formula:
  training goes through ``sparsevit::attention``).
"""
import functools
from typing import List, Optional

import torch
from torch import Tensor

from sparsevit import _ext

__all__ = ["cpu_attention", "reference_attention", "not_supported_reasons", "cpp_kernel_name"]

_DTYPES = (torch.float32, torch.bfloat16)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, attn_bias: Optional[Tensor], scale: float) -> Tensor:
    """fp32 (float64 for float64 inputs) math attention, cast back to ``q.dtype``."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale
    if attn_bias is not None:
        s = s + attn_bias.to(acc)
    return (torch.softmax(s, dim=-1) @ v.to(acc)).to(q.dtype)


@functools.lru_cache(maxsize=None)
def _kernel_missing_reason() -> Optional[str]:
    """Why this process has no compiled CPU attention (None: it has one). Fixed for the process, and
    asked on every attention call, so asked of the extension once."""
    if not _ext.has_op("attention_cpu"):
        return _ext.unavailable_reason("attention_cpu")
    if not torch.ops.sparsevit_C.attention_cpu_isa(-1):
        return "CPU lacks AVX2+FMA"
    return None


def not_supported_reasons(q: Tensor, k: Tensor, v: Tensor, attn_bias: Optional[Tensor] = None) -> List[str]:
    """Why the compiled CPU attention cannot take these inputs (empty list: it can)."""
    reasons = []
    missing = _kernel_missing_reason()
    if missing:
        reasons.append(missing)
    if any(t.device.type != "cpu" for t in (q, k, v)):
        reasons.append(f"q on {q.device}: the fused attention is CPU only")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        reasons.append(f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (fused CPU attention: one of float32, bfloat16)")
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        reasons.append(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need q/k "
                       f"[B, H, N, Dqk] and v [B, H, N, Dv] (self-attention)")
    if attn_bias is not None:
        if attn_bias.dtype not in _DTYPES:
            reasons.append(f"bias dtype {attn_bias.dtype} (float32 or bfloat16; convert bool masks first)")
        elif q.dim() == 4:
            try:
                torch.broadcast_shapes(attn_bias.shape, (*q.shape[:3], q.shape[2]))
            except RuntimeError:
                reasons.append(f"bias {tuple(attn_bias.shape)} does not broadcast to [B, H, N, N]")
    return reasons


def cpu_output_layout(out: Tensor) -> Tensor:
    """``out`` [B, H, N, Dv] in the CPU kernel's layout: a view of [B, N, H, Dv] memory, so the
    block's ``transpose(1, 2).reshape(B, N, H * Dv)`` is free. Every CPU path of the op returns it
    (and the fake says so), whichever implementation ran."""
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@torch.library.custom_op("sparsevit::cpu_attention", mutates_args=())
def _cpu_attention_op(q: Tensor, k: Tensor, v: Tensor, attn_bias: Optional[Tensor], scale: float) -> Tensor:
    return cpu_output_layout(reference_attention(q, k, v, attn_bias, scale))


@_cpu_attention_op.register_fake
def _(q, k, v, attn_bias, scale):
    return cpu_output_layout(q.new_empty((*q.shape[:-1], v.shape[-1])))


def _cpu_attention_cpu(q, k, v, attn_bias, scale):
    if not not_supported_reasons(q, k, v, attn_bias):
        return torch.ops.sparsevit_C.attention_cpu(q, k, v, attn_bias, scale, -1)
    return cpu_output_layout(reference_attention(q, k, v, attn_bias, scale))


_cpu_attention_op.register_kernel("cpu")(_cpu_attention_cpu)


def cpp_kernel_name() -> Optional[str]:
    """Name of the compiled attention kernel this machine runs (e.g. ``cpp_attention_avx512``), or None."""
    if not _ext.has_op("attention_cpu"):
        return None
    return torch.ops.sparsevit_C.attention_cpu_isa(-1) or None


def cpu_attention(q: Tensor, k: Tensor, v: Tensor, attn_bias: Optional[Tensor] = None,
                  scale: Optional[float] = None) -> Tensor:
    """``softmax(q @ k^T * scale + attn_bias) @ v`` on CPU for pruned heads; see the module docstring.

    Args:
        q, k: ``[B, H, N, Dqk]``; v: ``[B, H, N, Dv]``; float32 or bfloat16 (others: reference path).
        attn_bias: additive float bias broadcastable to ``[B, H, N, N]``, a bool mask (True = attend,
            turned into an additive one), or None.
        scale: softmax scale; default ``Dqk ** -0.5``.
    Returns: ``[B, H, N, Dv]`` in ``q``'s dtype.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if attn_bias is not None and attn_bias.dtype == torch.bool:
        attn_bias = torch.zeros(attn_bias.shape, device=q.device, dtype=torch.float32).masked_fill(
            ~attn_bias, float("-inf"))
    return _cpu_attention_op(q, k, v, attn_bias, float(scale))
