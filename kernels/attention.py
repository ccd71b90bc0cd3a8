"""Triton attention for pruned heads: ``softmax(q k^T * scale + bias) v`` (flash style, forward).

Shapes: ``q`` ``[B, H, Nq, Dqk]``, ``k`` ``[B, H, Nk, Dqk]``, ``v`` ``[B, H, Nk, Dv]``. After head-dim
pruning ``Dqk != Dv`` and neither is a power of two (40, 48, 56 ...): each is padded to the next
power of two (>= 16) *in registers* with masked loads, never in memory. Any head count: ``B * H``
is one grid axis. ``bias`` is anything broadcastable to ``[B, H, Nq, Nk]`` (BeiT/Swin relative
position bias, Swin's shifted-window mask pre-added by the caller); broadcast dims are read with
stride 0, so nothing is materialised.

Online softmax in base 2: scores are scaled by ``scale * log2(e)`` and the bias by ``log2(e)`` so
``exp2`` replaces ``exp``. Rows whose scores are all ``-inf`` produce NaN, like
``F.scaled_dot_product_attention``'s math path.
"""
from typing import List, Optional

import torch

from . import HAS_TRITON, TRITON_UNAVAILABLE_REASON, interpreting
from ._lazy import get_kernel

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # the module must import without triton; the kernel body below is never run then
    from ._lazy import tl_stub as tl

    triton = None

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, b_ptr, o_ptr,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_bb, s_bh, s_bm, s_bn,
    s_ob, s_oh, s_om, s_od,
    H, NQ, NK, DQK, DV, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,  # interpreter only: its tl.dot mishandles bf16 (exact upcast)
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_mask = offs_m < NQ
    dqk_mask = offs_dqk < DQK
    dv_mask = offs_dv < DV

    q = tl.load(q_ptr + off_b * s_qb + off_h * s_qh + offs_m[:, None] * s_qm + offs_dqk[None, :] * s_qd,
                mask=m_mask[:, None] & dqk_mask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = k_ptr + off_b * s_kb + off_h * s_kh
    v_base = v_ptr + off_b * s_vb + off_h * s_vh
    b_base = b_ptr + off_b * s_bb + off_h * s_bh + offs_m[:, None] * s_bm

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < NK
        kt = tl.load(k_base + cols[None, :] * s_kn + offs_dqk[:, None] * s_kd,
                     mask=n_mask[None, :] & dqk_mask[:, None], other=0.0)  # [BLOCK_DQK, BLOCK_N]
        if DOT_FP32:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            bias = tl.load(b_base + cols[None, :] * s_bn, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
            s = s + bias.to(tl.float32) * 1.4426950408889634
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep exp2 finite
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * s_vn + offs_dv[None, :] * s_vd,
                    mask=n_mask[:, None] & dv_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_DV]
        p = p.to(v.dtype)
        if DOT_FP32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    o = o_ptr + off_b * s_ob + off_h * s_oh + offs_m[:, None] * s_om + offs_dv[None, :] * s_od
    tl.store(o, out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & dv_mask[None, :])


def _configs():
    cfgs = []
    for bm, bn in ((32, 32), (64, 32), (64, 64), (128, 32), (128, 64)):
        for warps in (4, 8):
            for stages in (1, 2, 3):
                cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages))
    return cfgs


def _pow2(d: int) -> int:
    return max(16, 1 << (int(d) - 1).bit_length())


def attention_triton_unsupported_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                         attn_bias: Optional[torch.Tensor] = None) -> List[str]:
    """Why :func:`attention_triton` cannot take this input (empty list: it can)."""
    reasons = []
    if not HAS_TRITON:
        reasons.append(TRITON_UNAVAILABLE_REASON)
    elif not (q.is_cuda or interpreting()):
        reasons.append(f"q is on {q.device}, the Triton kernel needs CUDA (or TRITON_INTERPRET=1)")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        reasons.append(f"q/k/v must be 4-D [B, H, N, D], got {q.dim()}/{k.dim()}/{v.dim()}-D")
        return reasons
    if q.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {q.dtype} not in fp16/bf16/fp32")
    if not (q.dtype == k.dtype == v.dtype):
        reasons.append(f"q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        reasons.append("q/k/v on different devices")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3]:
        reasons.append(f"inconsistent shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        reasons.append(f"q head dim {q.shape[-1]} != k head dim {k.shape[-1]}")
    for name, d in (("q/k", q.shape[-1]), ("v", v.shape[-1])):
        if d > MAX_HEAD_DIM or d == 0:
            reasons.append(f"{name} head dim {d} outside 1..{MAX_HEAD_DIM}")
    if attn_bias is not None:
        if attn_bias.dtype == torch.bool or not attn_bias.is_floating_point():
            reasons.append(f"attn_bias dtype {attn_bias.dtype}: pass an additive float bias")
        if attn_bias.device != q.device:
            reasons.append(f"attn_bias on {attn_bias.device}, q on {q.device}")
        try:
            torch.broadcast_shapes(attn_bias.shape, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        except RuntimeError:
            reasons.append(f"attn_bias {tuple(attn_bias.shape)} not broadcastable to "
                           f"{(q.shape[0], q.shape[1], q.shape[2], k.shape[2])}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        reasons.append("inputs require grad: the Triton kernel is forward-only")
    return reasons


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, *, block_m: Optional[int] = None,
                     block_n: Optional[int] = None) -> torch.Tensor:
    """Flash-style attention forward; see the module docstring. Returns ``[B, H, Nq, Dv]``.

    ``block_m``/``block_n`` pin the tiles (no autotuning); under the interpreter they default to 32.
    """
    reasons = attention_triton_unsupported_reasons(q, k, v, attn_bias)
    if reasons:
        raise ValueError("attention_triton: " + "; ".join(reasons))
    B, H, NQ, DQK = q.shape
    NK, DV = k.shape[2], v.shape[3]
    if scale is None:
        scale = DQK ** -0.5
    o = torch.empty((B, H, NQ, DV), device=q.device, dtype=q.dtype)
    if o.numel() == 0:
        return o
    if attn_bias is not None:
        bias = attn_bias.expand(B, H, NQ, NK)  # a view: broadcast dims get stride 0
        bstrides = bias.stride()
    else:
        bias, bstrides = o, (0, 0, 0, 0)
    kernel, interp = get_kernel(_attn_fwd_kernel, _configs, key=("NQ", "NK", "BLOCK_DQK", "BLOCK_DV"))
    args = (q, k, v, bias, o, *q.stride(), *k.stride(), *v.stride(), *bstrides, *o.stride(),
            H, NQ, NK, DQK, DV, float(scale) * _LOG2E)
    prec = "ieee" if q.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32"
    meta = dict(BLOCK_DQK=_pow2(DQK), BLOCK_DV=_pow2(DV), HAS_BIAS=attn_bias is not None, PRECISION=prec,
                DOT_FP32=interp and q.dtype == torch.bfloat16)
    if interp or block_m is not None or block_n is not None:
        bm, bn = block_m or (32 if interp else 64), block_n or 32
        grid = (triton.cdiv(NQ, bm), B * H)
        fn = kernel if interp else kernel.fn
        extra = {} if interp else {"num_warps": 4}
        fn[grid](*args, BLOCK_M=bm, BLOCK_N=bn, **meta, **extra)
    else:
        grid = lambda m: (triton.cdiv(NQ, m["BLOCK_M"]), B * H)  # noqa: E731
        kernel[grid](*args, **meta)
    return o
