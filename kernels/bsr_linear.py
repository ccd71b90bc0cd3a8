"""Triton block-sparse linear: ``y = act(x @ W^T + b)`` with ``W`` ``[out, in]`` stored as BSR.

BSR layout (the one of :class:`sparsevit.formats.BlockSparseWeight`):

* ``values``       ``[nnz_blocks, bh, bw]``: the kept ``bh x bw`` tiles of ``W`` (rows of W = outputs);
  the last block row/column is zero-padded when ``out``/``in`` are not multiples of the block;
* ``col_indices``  int32 ``[nnz_blocks]``: block-column of each tile;
* ``crow_indices`` int32 ``[n_block_rows + 1]``: tiles of block-row ``r`` are ``crow[r]:crow[r+1]``.

Grid: one program per (block row of ``W``, token tile). Block rows are the fast grid axis, so the
programs that run together read the same ``x`` tile (L2 reuse) and, for small token counts (batch 1
is ``M = 197``), the parallelism comes from splitting ``N`` into its ``out/bh`` block rows instead
of from the tokens: a "split-N" grid with a small ``BLOCK_M`` picked by the autotuner. Each program
walks only its row's nonzero tiles, so the work is proportional to the kept blocks; empty rows
still write ``act(bias)``.

Epilogue: bias add, then GELU (``"gelu"``: erf form, ``"gelu_tanh"``: tanh form) in fp32, then the
cast to the output dtype. Accumulation is always fp32. For fp32 inputs the dot runs in TF32 unless
``torch.get_float32_matmul_precision() == "highest"`` (then IEEE fp32), mirroring cuBLAS.
"""
import math
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

SUPPORTED_BLOCKS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACTIVATIONS = {None: 0, "none": 0, "gelu": 1, "gelu_tanh": 2}


def _bsr_linear_kernel(
    x_ptr, val_ptr, col_ptr, crow_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_ym, stride_yn,
    M_BUCKET,  # autotune key only: token count rounded to a power of two
    BH: tl.constexpr, BW: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,  # interpreter only: its tl.dot mishandles bf16 (exact upcast)
):
    pid_r = tl.program_id(0)  # block row of W (fast axis)
    pid_m = tl.program_id(1)  # token tile
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, BH)
    offs_w = tl.arange(0, BW)
    m_mask = offs_m < M
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm

    start = tl.load(crow_ptr + pid_r)
    end = tl.load(crow_ptr + pid_r + 1)
    acc = tl.zeros((BLOCK_M, BH), dtype=tl.float32)
    # W tile j is [BH, BW] row-major; read it transposed as [BW, BH] so the dot gives x @ W^T.
    w_ptrs = val_ptr + start.to(tl.int64) * (BH * BW) + offs_w[:, None] + offs_h[None, :] * BW
    for j in range(start, end):
        c = tl.load(col_ptr + j)
        offs_k = c * BW + offs_w
        x = tl.load(x_rows + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)
        w = tl.load(w_ptrs)
        if DOT_FP32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        w_ptrs += BH * BW

    offs_n = pid_r * BH + offs_h
    n_mask = offs_n < N
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    if ACT == 1:  # GELU, erf form (nn.GELU())
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACT == 2:  # GELU, tanh form (nn.GELU(approximate="tanh")); tanh(u) = 1 - 2 / (exp(2u) + 1)
        u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = 0.5 * acc * (2.0 - 2.0 / (tl.exp(2.0 * tl.minimum(u, 15.0)) + 1.0))
    y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _configs():
    cfgs = []
    for bm in (16, 32, 64, 128):
        for warps in (2, 4, 8):
            if bm == 128 and warps == 2 or bm == 16 and warps == 8:
                continue
            for stages in (2, 3, 4):
                cfgs.append(triton.Config({"BLOCK_M": bm}, num_warps=warps, num_stages=stages))
    return cfgs


def _m_bucket(m: int) -> int:
    return 1 << max(4, min(14, math.ceil(math.log2(max(m, 1)))))


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # ignored by tl.dot for fp16/bf16 operands


def bsr_linear_unsupported_reasons(x: torch.Tensor, values: torch.Tensor, bias: Optional[torch.Tensor] = None,
                                   activation: Optional[str] = None) -> List[str]:
    """Why :func:`bsr_linear_triton` cannot take this input (empty list: it can)."""
    reasons = []
    if not HAS_TRITON:
        reasons.append(TRITON_UNAVAILABLE_REASON)
    elif not (x.is_cuda or interpreting()):
        reasons.append(f"x is on {x.device}, the Triton kernel needs CUDA (or TRITON_INTERPRET=1)")
    if x.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {x.dtype} not in fp16/bf16/fp32")
    if values.dtype != x.dtype:
        reasons.append(f"weight dtype {values.dtype} != input dtype {x.dtype}")
    if values.device != x.device:
        reasons.append(f"weight on {values.device}, input on {x.device}")
    if values.dim() != 3:
        reasons.append(f"values must be [nnz, bh, bw], got {tuple(values.shape)}")
    else:
        bh, bw = values.shape[1:]
        if bh not in SUPPORTED_BLOCKS or bw not in SUPPORTED_BLOCKS:
            reasons.append(f"block {bh}x{bw} unsupported (each side must be one of {SUPPORTED_BLOCKS})")
    if bias is not None and bias.device != x.device:
        reasons.append(f"bias on {bias.device}, input on {x.device}")
    if activation not in ACTIVATIONS:
        reasons.append(f"activation {activation!r} not in {sorted(a for a in ACTIVATIONS if a)}")
    return reasons


def bsr_linear_triton(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor,
                      crow_indices: torch.Tensor, out_features: int, bias: Optional[torch.Tensor] = None,
                      activation: Optional[str] = None, *, block_m: Optional[int] = None,
                      num_warps: int = 4) -> torch.Tensor:
    """``act(x @ W^T + bias)`` for ``x`` ``[..., in]`` and BSR ``W`` ``[out_features, in]``.

    ``block_m`` pins the token tile (no autotuning); it is required under the interpreter and
    defaults to 32 there. Raises ``ValueError`` listing the reasons when the input is unsupported.
    """
    reasons = bsr_linear_unsupported_reasons(x, values, bias, activation)
    if reasons:
        raise ValueError("bsr_linear_triton: " + "; ".join(reasons))
    bh, bw = int(values.shape[1]), int(values.shape[2])
    K = x.shape[-1]
    N = int(out_features)
    n_block_rows = crow_indices.numel() - 1
    if n_block_rows * bh < N:
        raise ValueError(f"crow_indices has {n_block_rows} block rows of {bh}: fewer than {N} outputs")
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y.reshape(*x.shape[:-1], N)
    values = values.contiguous()
    col_indices = col_indices.to(torch.int32).contiguous()
    crow_indices = crow_indices.to(torch.int32).contiguous()
    b = bias.to(x.dtype).contiguous() if bias is not None else y  # dummy pointer when no bias
    kernel, interp = get_kernel(_bsr_linear_kernel, _configs, key=("M_BUCKET", "N", "K", "BH", "BW"))
    args = (x2, values, col_indices, crow_indices, b, y, M, N, K,
            x2.stride(0), x2.stride(1), y.stride(0), y.stride(1), _m_bucket(M))
    meta = dict(BH=bh, BW=bw, HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation],
                PRECISION=_precision(x.dtype), DOT_FP32=interp and x.dtype == torch.bfloat16)
    if interp or block_m is not None:
        bm = block_m or 32
        grid = (n_block_rows, triton.cdiv(M, bm))
        if interp:
            kernel[grid](*args, BLOCK_M=bm, **meta)
        else:  # pinned config: bypass the autotuner
            kernel.fn[grid](*args, BLOCK_M=bm, num_warps=num_warps, **meta)
    else:
        grid = lambda meta_: (n_block_rows, triton.cdiv(M, meta_["BLOCK_M"]))  # noqa: E731
        kernel[grid](*args, **meta)
    return y.reshape(*x.shape[:-1], N)
