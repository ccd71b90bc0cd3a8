"""The modules ``accelerate`` swaps in for timm's: physically smaller, same function.

They are plain ``nn.Module``s built from explicit values the model adapter hands out (sliced
weights, scale, rel-pos index, window sizes, branch-norm values; never the source module or a
patched ``forward``), keep the callers' keyword arguments (``attn_mask``/``is_causal`` for ViT,
``shared_rel_pos_bias`` for BeiT, Swin's ``mask``), and hold their Linears as whatever module the
per-layer kernel choice produced (``nn.Linear``, or a sparse module from ``runtime.linear``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from sparsevit.ops.attention import attention as sparse_attention
from sparsevit.ops.attention import attention_unsupported_reasons
from sparsevit.ops.bsr_mlp import bsr_mlp_forward, fused_pair_args, run_direct_pair
from sparsevit.ops.fine_mlp import direct_pair_ok as direct_fine_pair_ok
from sparsevit.ops.fine_mlp import fused_mlp_forward
from sparsevit.ops.fine_mlp import run_direct_pair as run_direct_fine_pair
from sparsevit.ops.linear_kernels import eager_cpu_call_ok
from sparsevit.ops.residual import (fused_add_norm_call_ok, fused_add_norm_indices_ok, layernorm_gather,
                                    residual_add_layernorm, residual_scatter_add)
from sparsevit.runtime.block_program import block_program, run_program
from sparsevit.runtime.dense_linear import DenseLinear
from sparsevit.runtime.linear import SparseLinear


class ZeroPaddedLayerNorm(nn.Module):
    """LayerNorm over ``width`` channels of which only the kept ones are present; the others are zeros.

    What a LayerNorm over a branch's inner channels (timm's scale-norm, the MLP norm) computes in the
    masked dense model, where the removed channels are zero: statistics over the full width, zeros
    included, output for the kept channels only (the zeros' outputs meet zeroed weight columns).
    ``mean = sum(kept) / width``; the variance adds the zeros' ``(0 - mean)^2`` to the kept channels'
    squared deviations (no ``E[x^2] - mean^2`` cancellation). Accumulates in float32 at least.
    """

    def __init__(self, values):
        super().__init__()
        self.width, self.eps = int(values.width), float(values.eps)
        self.weight = None if values.weight is None else nn.Parameter(values.weight.clone())
        self.bias = None if values.bias is None else nn.Parameter(values.bias.clone())

    def extra_repr(self) -> str:
        n = "?" if self.weight is None else self.weight.shape[0]
        return f"kept={n}, width={self.width}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        if n == self.width:
            return F.layer_norm(x, (n,), self.weight, self.bias, self.eps)
        acc = torch.promote_types(x.dtype, torch.float32)
        xa = x.to(acc)
        mean = xa.sum(-1, keepdim=True) / self.width
        d = xa - mean
        var = (d.square().sum(-1, keepdim=True) + (self.width - n) * mean.square()) / self.width
        y = d * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(acc)
        if self.bias is not None:
            y = y + self.bias.to(acc)
        return y.to(x.dtype)


def head_norm(values) -> Optional[nn.LayerNorm]:
    """timm's qk-norm (a LayerNorm over each head's full head dim), from its values; None without one."""
    if values is None:
        return None
    w, b = values.weight, values.bias
    like = w if w is not None else b
    norm = nn.LayerNorm(values.width, eps=values.eps, elementwise_affine=w is not None, bias=b is not None,
                        device=None if like is None else like.device, dtype=None if like is None else like.dtype)
    with torch.no_grad():
        if w is not None:
            norm.weight.copy_(w)
        if b is not None:
            norm.bias.copy_(b)
    return norm


class SparseAttention(nn.Module):
    """Multi-head attention over the kept heads, with q/k and v head dims that may differ.

    ``qkv`` produces ``[q (H*dqk) | k (H*dqk) | v (H*dv)]``; ``scale`` is the original model's (the
    masked dense model scores with the unpruned head dim). BeiT/Swin keep their relative position
    bias table sliced to the kept heads; the ``[1, H, N, N]`` bias it expands to is cached for
    inference (recomputed in training mode, or after loading). ``q_norm`` / ``k_norm`` (timm's
    qk-norm, over the full head dim) run on q and k per head; ``norm`` (timm's scale-norm, a
    :class:`ZeroPaddedLayerNorm` over the kept v channels of all heads) runs before ``proj``.
    """

    def __init__(self, qkv: nn.Module, proj: nn.Module, num_heads: int, qk_dim: int, v_dim: int,
                 scale: float, rel_table: Optional[torch.Tensor] = None, rel_index: Optional[torch.Tensor] = None,
                 head_index: Optional[torch.Tensor] = None, attention_kernel: str = "sdpa",
                 q_norm: Optional[nn.Module] = None, k_norm: Optional[nn.Module] = None,
                 norm: Optional[nn.Module] = None):
        super().__init__()
        self.qkv, self.proj = qkv, proj
        self.q_norm, self.k_norm, self.norm = q_norm, k_norm, norm
        self.num_heads, self.qk_dim, self.v_dim, self.scale = num_heads, qk_dim, v_dim, float(scale)
        self.relative_position_bias_table = None if rel_table is None else nn.Parameter(rel_table)
        self.register_buffer("relative_position_index", rel_index, persistent=True)
        self.register_buffer("_rel_cache", None, persistent=False)
        # heads kept, to slice a bias shared across blocks (BeiT's shared_rel_pos_bias)
        self.register_buffer("head_index", head_index, persistent=True)
        self.attention_kernel = attention_kernel

    def has_rel_pos_bias(self) -> bool:
        return self.relative_position_bias_table is not None

    def rel_pos_bias(self) -> Optional[torch.Tensor]:
        if not self.has_rel_pos_bias():
            return None
        if self._rel_cache is not None and not self.training:
            return self._rel_cache
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        bias = bias.permute(2, 0, 1).unsqueeze(0).contiguous()
        # cache only real tensors: under torch.compile/export tracing `bias` is a fake tensor, and
        # keeping it would leave the eager module computing with a placeholder afterwards
        if not self.training and type(bias) is torch.Tensor and not torch.compiler.is_compiling():
            self._rel_cache = bias.detach()
        return bias

    def _apply(self, fn, *args, **kwargs):
        self._rel_cache = None  # dtype/device changes invalidate the cached bias
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._rel_cache = None  # a loaded table replaces the one the cache was built from
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, qk_dim={self.qk_dim}, v_dim={self.v_dim}, kernel={self.attention_kernel}"

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                shared_rel_pos_bias: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        B, N, _ = x.shape
        H, dqk, dv = self.num_heads, self.qk_dim, self.v_dim
        qkv = self.qkv(x)
        if dqk == dv:  # one view + permute instead of a split and three view/transposes (batch-1 overhead)
            q, k, v = qkv.view(B, N, 3, H, dqk).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = qkv.split((H * dqk, H * dqk, H * dv), dim=-1)
            q = q.view(B, N, H, dqk).transpose(1, 2)
            k = k.view(B, N, H, dqk).transpose(1, 2)
            v = v.view(B, N, H, dv).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        bias = self.rel_pos_bias()
        if bias is not None and bias.shape[-1] != N:
            raise ValueError(f"SparseAttention: relative position bias was built for {bias.shape[-1]} tokens, "
                             f"got {N}; accelerate the model at the input size you run it at.")
        if shared_rel_pos_bias is not None:
            shared = shared_rel_pos_bias.index_select(-3, self.head_index)
            bias = shared if bias is None else bias + shared
        if mask is not None:  # Swin shifted-window mask [nW, N, N]
            nw = mask.shape[0]
            m = mask.view(1, nw, 1, N, N).to(q.dtype)
            base = bias if bias is not None else q.new_zeros(1, H, N, N)
            bias = (base.unsqueeze(1) + m).expand(B // nw, nw, H, N, N).reshape(B, H, N, N)
        if attn_mask is not None:
            if bias is None:
                bias = attn_mask
            elif attn_mask.dtype == torch.bool:
                bias = bias.masked_fill(~attn_mask, float("-inf"))
            else:
                bias = bias + attn_mask
        if bias is not None and bias.dtype != q.dtype and bias.dtype != torch.bool:
            bias = bias.to(q.dtype)
        if self.attention_kernel == "sparsevit" and not is_causal:
            out = sparse_attention(q, k, v, bias, self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=is_causal, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, N, H * dv)
        if self.norm is not None:
            out = self.norm(out)
        return self.proj(out)


class SparseMlp(nn.Module):
    """fc1 -> act -> norm -> fc2 over the kept hidden channels. ``act`` is ``None`` when fc1 fuses it;
    ``norm`` (timm's MLP norm, a :class:`ZeroPaddedLayerNorm`) is ``None`` without one."""

    def __init__(self, fc1: nn.Module, act: Optional[nn.Module], fc2: nn.Module, norm: Optional[nn.Module] = None):
        super().__init__()
        self.fc1, self.act, self.fc2, self.norm = fc1, act, fc2, norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_mlp_forward(self.fc1, self.act, self.norm, self.fc2, x)  # both fine-grained, eager CPU
        if fused is None:  # both block-sparse, chosen fused by runtime/mlp_pair.py
            fused = bsr_mlp_forward(self.fc1, self.act, self.norm, self.fc2, x)
        if fused is not None:
            return fused
        h = self.fc1(x)
        if self.act is not None:
            h = self.act(h)
        if self.norm is not None:
            h = self.norm(h)
        return self.fc2(h)


class BranchIO(nn.Module):
    """How a branch meets the residual stream: norm (with the read subset fused in) and write-back.

    ``read`` / ``write`` are positions in the (possibly globally sliced) residual stream, or ``None``
    for all of it. Layer scale is folded into the branch's last Linear at build time, so the write is
    a plain add or a scatter-add.
    """

    def __init__(self, norm: nn.LayerNorm, read: Optional[torch.Tensor], write: Optional[torch.Tensor]):
        super().__init__()
        self.eps = norm.eps
        self.full_norm = norm if read is None else None
        if read is not None:
            self.register_buffer("read", read.to(torch.long), persistent=True)
            self.norm_weight = nn.Parameter(norm.weight.detach()[read].clone()) if norm.weight is not None else None
            self.norm_bias = nn.Parameter(norm.bias.detach()[read].clone()) if norm.bias is not None else None
        else:
            self.read = None
        self.register_buffer("write", None if write is None else write.to(torch.long), persistent=True)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.read is None:
            return self.full_norm(x)
        return layernorm_gather(x, self.norm_weight, self.norm_bias, self.read, self.eps)

    def add(self, x: torch.Tensor, y: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Write the branch output back; ``inplace`` only for tensors the block itself created."""
        if self.write is None:
            return x.add_(y) if inplace else x + y
        return residual_scatter_add(x, self.write, y, inplace=inplace)

    def norm_values(self):
        """(weight, bias, read index or None, eps) of this branch's norm over the residual stream."""
        if self.read is None:
            n = self.full_norm
            return n.weight, n.bias, None, n.eps
        return self.norm_weight, self.norm_bias, self.read, self.eps

    def norm_hooked(self) -> bool:
        """Whether the norm is a module with forward hooks: the fused paths, which compute the norm
        without calling it, must then call it so that the hooks fire and can change its output."""
        n = self._modules.get("full_norm")  # asked per block per forward: no nn.Module.__getattr__
        return n is not None and bool(n._forward_hooks or n._forward_pre_hooks)

    def add_then_norm(self, x: torch.Tensor, y: torch.Tensor, reader: "BranchIO",
                      inplace: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(x2, reader.norm(x2))`` with ``x2 = self.add(x, y, inplace)``, in one pass over each row
        (two steps when the reader's norm has hooks)."""
        if reader.norm_hooked():
            x2 = self.add(x, y, inplace)
            return x2, reader.norm(x2)
        weight, bias, read, eps = reader.norm_values()
        return residual_add_layernorm(x, y, self.write, weight, bias, read, eps, inplace=inplace)


class ConstBranch(nn.Module):
    """A branch that kept no heads / hidden channels: it adds its output bias (times layer scale)."""

    def __init__(self, value: torch.Tensor, write: Optional[torch.Tensor]):
        super().__init__()
        self.value = nn.Parameter(value, requires_grad=False)
        self.register_buffer("write", None if write is None else write.to(torch.long), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.write is None:
            return x + self.value
        return x.index_add(-1, self.write, self.value.expand(*x.shape[:-1], -1))


class NormCarry:
    """The next block's normed input, computed by the block before it with its residual add.

    :class:`SparseBlockSequence` sets ``next_io`` (the next block's attention :class:`BranchIO`);
    the block that fuses its last add with that norm leaves ``(output, normed)`` here, and the next
    block takes ``normed`` only if its input is that very output tensor (a forward hook that replaced
    the output makes it recompute the norm).
    """

    __slots__ = ("next_io", "_source", "_normed")

    def __init__(self):
        self.next_io, self._source, self._normed = None, None, None

    def put(self, source: torch.Tensor, normed: torch.Tensor) -> None:
        self._source, self._normed = source, normed

    def take(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        normed = self._normed if self._source is x else None
        self._source, self._normed = None, None
        return normed


class SparseBlock(nn.Module):
    """A pre-norm ViT/DeiT/BeiT block with its branches sliced, replaced by constants, or removed.

    ``attn_const`` / ``mlp_const`` are :class:`ConstBranch` es for branches that kept only their bias.
    The attention write-back and the MLP norm run as one fused pass; called with a
    :class:`NormCarry` (by :class:`SparseBlockSequence`) the MLP write-back also computes the next
    block's first norm.
    """

    def __init__(self, attn_io: Optional[BranchIO], attn: Optional[nn.Module], attn_const: Optional[nn.Module],
                 mlp_io: Optional[BranchIO], mlp: Optional[nn.Module], mlp_const: Optional[nn.Module]):
        super().__init__()
        self.attn_io, self.attn, self.mlp_io, self.mlp = attn_io, attn, mlp_io, mlp
        self.attn_const, self.mlp_const = attn_const, mlp_const

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                shared_rel_pos_bias: Optional[torch.Tensor] = None, carry: Optional[NormCarry] = None) -> torch.Tensor:
        normed = carry.take(x) if carry is not None else None
        h = None  # the MLP's normed input, when the attention write-back computed it
        # Whether x may be updated in place. A carried norm means x is the previous block's output,
        # made inside the sequence and seen by nobody else (the chained path runs without hooks);
        # any other input belongs to the caller. In-place saves a copy of the residual stream.
        owned = normed is not None and not torch.is_grad_enabled()
        if self.attn is not None:
            y = self.attn(self.attn_io.norm(x) if normed is None else normed, attn_mask=attn_mask,
                          is_causal=is_causal, shared_rel_pos_bias=shared_rel_pos_bias)
            if self.mlp is not None:
                x, h = self.attn_io.add_then_norm(x, y, self.mlp_io, inplace=owned)
            else:
                x = self.attn_io.add(x, y, inplace=owned)
            owned = True
        elif self.attn_const is not None:
            x, owned = self.attn_const(x), True
        if self.mlp is not None:
            y = self.mlp(self.mlp_io.norm(x) if h is None else h)
            inplace = owned and not torch.is_grad_enabled()
            if carry is not None and carry.next_io is not None:
                x, normed = self.mlp_io.add_then_norm(x, y, carry.next_io, inplace=inplace)
                carry.put(x, normed)
            else:
                x = self.mlp_io.add(x, y, inplace=inplace)
        elif self.mlp_const is not None:
            x = self.mlp_const(x)
        return x


class SparseBlockSequence(nn.Sequential):
    """timm's ``blocks`` Sequential of :class:`SparseBlock` s, passing each block's first norm along.

    Each block's MLP write-back also computes the next block's attention norm (one pass over the
    residual stream instead of two). Indexing, iteration and state-dict keys are those of the
    ``nn.Sequential`` it replaces; a caller that loops over the blocks itself gets the unfused path.
    Under torch.compile/export/tracing it is a plain loop (the compilers fuse on their own).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = list(self)
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or _any_hooks(blocks):
            # a hook may change a block's output in place, which would make the carried norm stale
            for blk in blocks:
                x = blk(x)
            return x
        parts = _lean_parts(blocks, x)
        if parts is not None:
            return _lean_forward(x, parts)
        carry = NormCarry()
        for blk, nxt in zip(blocks, blocks[1:] + [None]):
            fusable = isinstance(nxt, SparseBlock) and nxt.attn is not None
            carry.next_io = nxt.attn_io if fusable else None
            x = blk(x, carry=carry) if isinstance(blk, SparseBlock) else blk(x)
        return x


# ------------------------------------------------------------------ the lean eager path
# A DeiT-S forward spends ~2 ms in Python whatever the batch (of ~9 at batch 1, ~80 at batch 8):
# module calls, attribute look-ups through nn.Module.__getattr__, and the per-op "plain eager CPU
# call?" checks, ~84 of them. When the whole sequence qualifies (checked once per forward, from the
# modules' dicts, so a replaced module, an added hook or a dtype change is seen at the next forward),
# the blocks run as straight calls of the same compiled ops with the same arguments (each Linear's
# ``lean_call``: BSR, fine-grained, oneDNN or the fused MLP pairs): the result is bit-identical to the
# module path.
class _LeanBlock(tuple):
    """(block, attn_io, mlp_io, attention module, qkv call, proj call, MLP call): each call ``f(x2d)``."""


def _lean_linear(lin, dtype):
    """``lin.lean_call(dtype)`` for the Linear modules accelerate builds, without hooks; else None."""
    if type(lin) not in (SparseLinear, DenseLinear) or lin._forward_hooks or lin._forward_pre_hooks:
        return None
    return lin.lean_call(dtype)


def _lean_mlp(mlp, dtype):
    """``f(x2d) = fc2(fc1(x2d))`` as :meth:`SparseMlp.forward` runs it (``act`` and ``norm`` None): one
    fused fine_mlp or bsr_mlp call where it would make one, else the two layers' calls; or None."""
    fc1, fc2 = mlp._modules.get("fc1"), mlp._modules.get("fc2")
    first, second = _lean_linear(fc1, dtype), _lean_linear(fc2, dtype)
    if first is None or second is None:
        return None
    if direct_fine_pair_ok(fc1, fc2, dtype):
        return lambda x2d: run_direct_fine_pair(fc1, fc2, x2d)
    pair = fused_pair_args(fc1, fc2)
    if pair is not None:
        return lambda x2d: run_direct_pair(fc1, pair[0], fc2, pair[1], x2d)
    return lambda x2d: second(first(x2d))


def _lean_block(blk, dtype):
    """The pieces of one block for :func:`_lean_forward`, or None when any part needs the module path."""
    if type(blk) is not SparseBlock or blk._modules.get("attn_const") is not None or blk._modules.get("mlp_const") is not None:
        return None
    attn, mlp = blk._modules.get("attn"), blk._modules.get("mlp")
    if type(attn) is not SparseAttention or type(mlp) is not SparseMlp:
        return None
    am, mm = attn._modules, mlp._modules
    if (attn.attention_kernel != "sparsevit" or attn.qk_dim != attn.v_dim or am.get("q_norm") is not None
            or am.get("norm") is not None or attn.has_rel_pos_bias()
            or mm.get("act") is not None or mm.get("norm") is not None):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in (attn, mlp)):
        return None
    calls = (_lean_linear(am.get("qkv"), dtype), _lean_linear(am.get("proj"), dtype), _lean_mlp(mlp, dtype))
    if any(call is None for call in calls):
        return None
    return _LeanBlock((blk, blk._modules.get("attn_io"), blk._modules.get("mlp_io"), attn, *calls))


def _lean_parts(blocks, x: torch.Tensor):
    """Every block's pieces when the whole sequence can take the lean path for ``x`` (plain eager CPU
    inference, no grad, no hooks (checked by the caller), supported modules only); else None."""
    if torch.is_grad_enabled() or x.dim() != 3 or not blocks:
        return None
    parts = []
    for blk in blocks:
        part = _lean_block(blk, x.dtype)
        if part is None:
            return None
        parts.append(part)
    # every layer's weights have x's dtype (lean_call): what is left to ask is about x and the call
    if not eager_cpu_call_ok(x, x):
        return None
    return parts


def _direct_add_norm_args(io, reader, dtype):
    """``(write, weight, bias, read, eps)`` of the fused add+norm op for ``io``'s write-back and
    ``reader``'s norm when the op takes them (:func:`fused_add_norm_indices_ok`; the call part is asked
    once per forward); None when :meth:`BranchIO.add_then_norm` must run (hooked norm, bf16 subsets)."""
    if reader.norm_hooked():
        return None
    weight, bias, read, eps = reader.norm_values()
    if not fused_add_norm_indices_ok(dtype, io.write, read):
        return None
    return io.write, weight, bias, read, float(eps)


def _add_then_norm(io, reader, x, y, inplace: bool, fused: bool):
    """``io.add_then_norm(x, y, reader, inplace)``: the same op with the same arguments, minus the
    wrapper's per-call checks (~9 us, 23 calls a forward) when ``fused`` (the call part, asked once)."""
    args = _direct_add_norm_args(io, reader, x.dtype) if fused else None
    if args is None or (inplace and not x.is_contiguous()):
        return io.add_then_norm(x, y, reader, inplace=inplace)
    if inplace:
        return x, torch.ops.sparsevit_C.residual_add_layernorm_(x, y.contiguous(), *args)
    return torch.ops.sparsevit_C.residual_add_layernorm(x.contiguous(), y.contiguous(), *args)


def _lean_forward(x: torch.Tensor, parts) -> torch.Tensor:
    """:class:`SparseBlockSequence`'s forward as straight op calls (see the section comment)."""
    B, N, _ = x.shape
    T = B * N
    normed = parts[0][1].norm(x)
    fused = fused_add_norm_call_ok(x, x)  # the residual stream keeps x's dtype and device
    program = block_program(parts, x, lambda io, reader, dtype: _direct_add_norm_args(io, reader, dtype)
                            if fused else None)
    if program is not None:  # every step one of the C++ loop's ops: the same calls without Python between
        x, y = run_program(x, normed, program)
        return parts[-1][2].add(x, y, inplace=True)
    owned = False  # x is the caller's: the first write-back makes a new tensor
    direct_attention = None  # decided at the first block; dtype, device and layout are every block's
    for i, (_block, attn_io, mlp_io, attention, qkv, proj, mlp) in enumerate(parts):
        H, d = attention.num_heads, attention.qk_dim
        q, k, v = qkv(normed.reshape(T, -1)).view(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        if direct_attention is None:
            direct_attention = not attention_unsupported_reasons(q, k, v)
        if direct_attention:
            # the call sparse_attention makes in eager CPU inference (_lean_parts checked that), minus
            # its per-call checks (~10 us, 12 calls a forward)
            out = torch.ops.sparsevit_C.attention_cpu(q, k, v, None, attention.scale, -1)
        else:
            out = sparse_attention(q, k, v, None, attention.scale)
        y = proj(out.transpose(1, 2).reshape(T, H * d)).view(B, N, -1)
        x, h = _add_then_norm(attn_io, mlp_io, x, y, owned, fused)
        owned = True
        y = mlp(h.reshape(T, -1)).view(B, N, -1)
        if i + 1 < len(parts):
            x, normed = _add_then_norm(mlp_io, parts[i + 1][1], x, y, True, fused)
        else:
            x = mlp_io.add(x, y, inplace=True)
    return x


def window_partition(x: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    """``[B, H, W, C]`` (H, W multiples of the window) -> ``[B * nW, wh * ww, C]``, row-major windows."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, C)


def window_reverse(windows: torch.Tensor, window: Tuple[int, int], H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``[B * nW, wh * ww, C]`` -> ``[B, H, W, C]``."""
    wh, ww = window
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


class SparseSwinBlock(nn.Module):
    """A Swin block (shifted-window attention) with sliced or removed branches.

    Built from explicit values: window and shift sizes and the ``[nW, N, N]`` shifted-window mask
    (``None`` without a shift). Window partitioning is channel-agnostic, so the branch's read subset
    is gathered by the norm before partitioning and its output scattered back after the windows are
    merged.
    """

    def __init__(self, window_size: Tuple[int, int], shift_size: Tuple[int, int], attn_mask: Optional[torch.Tensor],
                 attn_io, attn, attn_const, mlp_io, mlp, mlp_const):
        super().__init__()
        self.window_size = tuple(int(v) for v in window_size)
        self.shift_size = tuple(int(v) for v in shift_size)
        self.register_buffer("attn_mask", attn_mask, persistent=False)
        self.attn_io, self.attn, self.mlp_io, self.mlp = attn_io, attn, mlp_io, mlp
        self.attn_const, self.mlp_const = attn_const, mlp_const

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        wh, ww = self.window_size
        has_shift = any(self.shift_size)
        if has_shift:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        x = F.pad(x, (0, 0, 0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh))
        _, Hp, Wp, _ = x.shape
        out = self.attn(window_partition(x, self.window_size), mask=self.attn_mask)
        out = window_reverse(out, self.window_size, Hp, Wp)[:, :H, :W, :]
        if has_shift:
            out = torch.roll(out, shifts=self.shift_size, dims=(1, 2))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = self.attn_io.add(x, self._attn(self.attn_io.norm(x)))
        elif self.attn_const is not None:
            x = self.attn_const(x)
        if self.mlp is not None:
            x = self.mlp_io.add(x, self.mlp(self.mlp_io.norm(x)))
        elif self.mlp_const is not None:
            x = self.mlp_const(x)
        return x


def _any_hooks(blocks) -> bool:
    """Whether a forward hook could see or change a block's output or input (global hooks, or hooks
    on the blocks themselves), which would make a carried norm stale.

    Of the modules inside a block only the attention norm needs a check: the carried norm stands in
    for its call. The others run as they would unchained (the carry is computed after the block's
    last submodule call, from the block's output). Not every submodule is walked: this runs on every
    forward, and at batch 1 a walk of all modules costs about as much as a small kernel."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    for blk in blocks:
        if blk._forward_hooks or blk._forward_pre_hooks:
            return True
        io = blk._modules.get("attn_io") if isinstance(blk, SparseBlock) else None
        if io is not None and io.norm_hooked():
            return True
    return False


def chain_block_norms(model: nn.Module) -> bool:
    """Make a ViT's ``blocks`` Sequential a :class:`SparseBlockSequence` (each block's last residual
    add computes the next block's first norm). Only a plain ``nn.Sequential`` of :class:`SparseBlock` s
    that timm calls as a whole qualifies; anything else is left as it is. Returns whether it did."""
    blocks = getattr(model, "blocks", None)
    if type(blocks) is not nn.Sequential or not all(isinstance(b, SparseBlock) for b in blocks):
        return False
    model.blocks = SparseBlockSequence(*blocks)
    return True
