"""``sparsevit::attention``: attention for pruned heads, as a custom op.

``attention(q, k, v, attn_bias=None, scale=None)`` computes ``softmax(q k^T * scale + attn_bias) v``
for ``q``/``k`` ``[B, H, N, Dqk]`` and ``v`` ``[B, H, N, Dv]``. After head pruning ``H`` is any
count and after head-dim pruning ``Dqk != Dv`` and neither is a power of two. ``scale`` defaults
to ``Dqk ** -0.5``; callers that pruned head-dim channels pass the *original* head dim's scale,
since the model was trained with it. ``attn_bias`` is additive and broadcastable to
``[B, H, N, N]`` (BeiT/Swin relative-position bias, with Swin's shifted-window mask pre-added); a
boolean mask (True = attend) is accepted and turned into an additive one.

Dispatch: on CUDA the Triton flash kernel (:mod:`sparsevit.kernels.attention`), on CPU the fused
C++ kernel (:mod:`sparsevit.ops.cpu_attention`), each when :func:`attention_unsupported_reasons`
is empty, else ``F.scaled_dot_product_attention``; :func:`attention_kernel_name` names what runs
(the per-layer report shows it, or the reasons). The op has a fake impl and an autograd formula,
so masked fine-tuning can run through it too. A traced CPU forward (``torch.export`` /
``torch.compile``, or one under a dispatch mode such as ``FlopCounterMode``) calls SDPA directly:
a standard op every exporter, counter and Inductor lowers, so compiled packages do not depend on
sparsevit's Python ops.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsevit.ops._autocast import register_autocast
from sparsevit.ops.cpu_attention import cpu_output_layout
from sparsevit.ops.linear_kernels import eager_cpu_call_ok, standard_ops_wanted

try:
    from sparsevit import kernels as _kernels
except Exception as exc:  # noqa: BLE001 - keep the SDPA path whatever happened
    _kernels = None
    _KERNELS_ERROR = f"sparsevit.kernels failed to import ({type(exc).__name__}: {exc})"
else:
    _KERNELS_ERROR = None


def attention_unsupported_reasons(q: Tensor, k: Tensor, v: Tensor, attn_bias: Optional[Tensor] = None) -> List[str]:
    """Why the fused kernel of ``q``'s device (Triton on CUDA, C++ on CPU) cannot take this input
    (empty list: it can). Goes into the report."""
    if q.device.type == "cpu":
        from sparsevit.ops import cpu_attention

        if attn_bias is not None and attn_bias.dtype == torch.bool:
            attn_bias = torch.empty(attn_bias.shape, dtype=q.dtype)  # converted to additive by attention()
        return cpu_attention.not_supported_reasons(q, k, v, attn_bias)
    if _kernels is None:
        return [_KERNELS_ERROR]
    if attn_bias is not None and attn_bias.dtype == torch.bool:
        attn_bias = torch.empty(attn_bias.shape, device=attn_bias.device, dtype=q.dtype)  # converted below
    reasons = []
    if not q.is_cuda:
        reasons.append(f"q is on {q.device}: the Triton kernel runs on CUDA only (SDPA is used)")
    reasons += [r for r in _kernels.attention_triton_unsupported_reasons(q, k, v, attn_bias)
                if "needs CUDA" not in r and "require grad" not in r]
    return reasons


def attention_kernel_name(device: torch.device) -> str:
    """What runs attention on ``device`` when :func:`attention_unsupported_reasons` is empty."""
    if torch.device(device).type == "cpu":
        from sparsevit.ops import cpu_attention

        return cpu_attention.cpp_kernel_name() or "cpp_attention"
    return "triton_attention"


def _sdpa(q: Tensor, k: Tensor, v: Tensor, attn_bias: Optional[Tensor], scale: float) -> Tensor:
    if attn_bias is not None and attn_bias.dtype != q.dtype:
        attn_bias = attn_bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)


@torch.library.custom_op("sparsevit::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, attn_bias: Optional[Tensor], scale: float) -> Tensor:
    if q.is_cuda and not attention_unsupported_reasons(q, k, v, attn_bias):
        with torch.no_grad():
            return _kernels.attention_triton(q, k, v, attn_bias, scale)
    if q.device.type == "cpu" and not attention_unsupported_reasons(q, k, v, attn_bias):
        return torch.ops.sparsevit_C.attention_cpu(q, k, v, attn_bias, scale, -1)
    out = _sdpa(q, k, v, attn_bias, scale)
    return cpu_output_layout(out) if q.device.type == "cpu" else out


@_attention_op.register_fake
def _(q, k, v, attn_bias, scale):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    return cpu_output_layout(out) if q.device.type == "cpu" else out


def _setup_context(ctx, inputs, output):
    q, k, v, attn_bias, scale = inputs
    ctx.save_for_backward(q, k, v, attn_bias)
    ctx.scale = scale


def _backward(ctx, grad_out):
    # Recompute the probabilities in fp32 (the forward never materialised them).
    q, k, v, attn_bias = ctx.saved_tensors
    qf, kf, vf, go = q.float(), k.float(), v.float(), grad_out.float()
    s = (qf @ kf.transpose(-2, -1)) * ctx.scale
    if attn_bias is not None:
        s = s + attn_bias.float()
    p = torch.softmax(s, dim=-1)
    dv = p.transpose(-2, -1) @ go
    dp = go @ vf.transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = (ds @ kf) * ctx.scale
    dk = (ds.transpose(-2, -1) @ qf) * ctx.scale
    dbias = None
    if attn_bias is not None and ctx.needs_input_grad[3]:
        dbias = ds
        for dim, size in enumerate(attn_bias.shape):  # sum over broadcast dims
            if size == 1 and dbias.shape[dim] != 1:
                dbias = dbias.sum(dim, keepdim=True)
        dbias = dbias.to(attn_bias.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)
register_autocast("sparsevit::attention", "lower")  # like F.scaled_dot_product_attention


def attention(q: Tensor, k: Tensor, v: Tensor, attn_bias: Optional[Tensor] = None,
              scale: Optional[float] = None) -> Tensor:
    """``softmax(q @ k^T * scale + attn_bias) @ v`` for pruned heads; see the module docstring.

    Args:
        q, k: ``[B, H, N, Dqk]``; v: ``[B, H, N, Dv]`` (``Dv`` may differ from ``Dqk``).
        attn_bias: additive float bias broadcastable to ``[B, H, N, N]``, or a bool mask (True =
            attend), or None.
        scale: softmax scale; default ``Dqk ** -0.5`` (pass the original head dim's scale after
            head-dim pruning).
    Returns: ``[B, H, N, Dv]`` in ``q``'s dtype; on CPU a view of ``[B, N, H, Dv]`` memory, so
        ``out.transpose(1, 2).reshape(B, N, H * Dv)`` is free (use ``.reshape``, not ``.view``, on it).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if q.device.type == "cpu" and standard_ops_wanted():
        return _sdpa(q, k, v, attn_bias, float(scale))  # see the module docstring
    if attn_bias is not None and attn_bias.dtype == torch.bool:
        attn_bias = torch.zeros(attn_bias.shape, device=q.device, dtype=q.dtype).masked_fill(
            ~attn_bias, float("-inf"))
    no_grad_kv = not (torch.is_grad_enabled() and (k.requires_grad or v.requires_grad))
    if eager_cpu_call_ok(q, q, attn_bias) and no_grad_kv and not attention_unsupported_reasons(q, k, v, attn_bias):
        # what the op runs on CPU, without its Python dispatch (see eager_cpu_call_ok)
        return torch.ops.sparsevit_C.attention_cpu(q, k, v, attn_bias, float(scale), -1)
    return _attention_op(q, k, v, attn_bias, float(scale))
