"""Triton attention for pruned heads (interpreter, vs float64) and the ``sparsevit::attention`` op.

Interpreter mode (``TRITON_INTERPRET=1``; in a full pytest run the tests re-run in a child process):
see ``tests/triton_harness.py``.

Accuracy rule (flash-attention / xformers style): the kernel's max error against a float64
reference is at most 2x the error of PyTorch doing the same computation in the same dtype (with a
floor of a few ulps of the output scale, so an exact PyTorch result cannot make the bound zero).
For attention "PyTorch in the same dtype" is timm's eager formulation (``(q*scale) @ k^T + bias``,
softmax, ``@ v`` all in that dtype, as flash-attention's tests do); SDPA is checked too in fp32.
Shapes are Swin windows (N=49), BeiT/ViT (N=197, fp32 only: the interpreter is slow) and odd ones,
with non-power-of-two head dims and Dqk != Dv.
"""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from triton_harness import IN_PROCESS, K, interp, run_self_in_subprocess  # noqa: E402


@pytest.mark.skipif(IN_PROCESS, reason="interpreter active in-process: the tests ran here")
def test_in_subprocess():
    run_self_in_subprocess(os.path.abspath(__file__))


def eager_attention(q, k, v, bias, scale):
    """timm's non-fused path, in the inputs' dtype."""
    a = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        a = a + bias.to(a.dtype)
    return a.softmax(-1) @ v


def check(out, ref64, torch_out, dtype, what):
    err = (out.double() - ref64).abs()
    torch_err = (torch_out.double() - ref64).abs().max().item()
    floor = 4 * torch.finfo(dtype).eps * ref64.abs().max().item()
    bound = max(2 * torch_err, floor)
    worst = int(err.argmax())
    assert err.max().item() <= bound, (
        f"{what}: max err {err.max().item():.3e} > bound {bound:.3e} (torch err {torch_err:.3e}); worst at flat "
        f"{worst}: got {out.flatten()[worst].item():.6f}, want {ref64.flatten()[worst].item():.6f}")


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


CASES = [  # (B, H, N, Dqk, Dv, bias shape or None, scale head dim)
    (2, 3, 49, 40, 24, (1, 3, 49, 49), 64),     # Swin window, rel-pos bias shared over windows
    (3, 2, 49, 32, 32, (3, 1, 49, 49), 32),     # Swin shifted-window mask per window, shared over heads
    (1, 2, 37, 48, 56, None, 64),               # odd N, Dv > Dqk
    (2, 1, 20, 16, 40, (2, 1, 1, 20), 16),      # key-padding style bias
    (1, 5, 13, 56, 8, (5, 13, 13), 56),         # 3-D bias, tiny Dv
]


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_attention_matches_float64(dtype, case):
    B, H, N, dqk, dv, bshape, sdim = CASES[case]
    q, k, v = rand(B, H, N, dqk, seed=case), rand(B, H, N, dqk, seed=10 + case), rand(B, H, N, dv, seed=20 + case)
    bias = rand(*bshape, seed=30 + case) * 2 if bshape else None
    if case == 1:  # Swin's mask: -100 where windows do not attend
        bias = bias.masked_fill(rand(*bshape, seed=99) > 1.0, -100.0)
    scale = sdim ** -0.5
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    out = K.attention_triton(c(q), c(k), c(v), None if bias is None else bias.float(), scale,
                             block_m=16 if case % 2 else 32, block_n=16 if case == 2 else 32)
    assert out.shape == (B, H, N, dv) and out.dtype == dtype
    ref = eager_attention(q, k, v, bias, scale)
    check(out, ref, eager_attention(c(q), c(k), c(v), c(bias), scale), dtype, f"{dtype} case={CASES[case]}")
    if dtype == torch.float32:
        sdpa = F.scaled_dot_product_attention(c(q), c(k), c(v), attn_mask=c(bias), scale=scale)
        check(out, ref, sdpa, dtype, f"vs SDPA case={CASES[case]}")


@interp
def test_attention_vit_197_tokens_fp32():
    q, k, v = rand(1, 2, 197, 40, seed=1), rand(1, 2, 197, 40, seed=2), rand(1, 2, 197, 48, seed=3)
    bias = rand(1, 2, 197, 197, seed=4)  # BeiT relative position bias
    out = K.attention_triton(q.float(), k.float(), v.float(), bias.float(), 64 ** -0.5, block_m=64, block_n=64)
    ref = eager_attention(q, k, v, bias, 64 ** -0.5)
    check(out, ref, eager_attention(q.float(), k.float(), v.float(), bias.float(), 64 ** -0.5), torch.float32,
          "N=197")


@interp
def test_attention_noncontiguous_qkv():
    qkv = rand(2, 29, 3, 3, 40, seed=5).float().permute(2, 0, 3, 1, 4)  # timm's qkv layout, strided views
    q, k, v = qkv[0], qkv[1], qkv[2][..., :24]
    out = K.attention_triton(q, k, v, None, 0.2)
    check(out, eager_attention(q.double(), k.double(), v.double(), None, 0.2),
          eager_attention(q, k, v, None, 0.2), torch.float32, "strided")


@interp
def test_attention_unsupported_reasons():
    q, v = torch.randn(1, 2, 8, 300), torch.randn(1, 2, 8, 16)
    reasons = K.attention_triton_unsupported_reasons(q, q, v, torch.zeros(1, 2, 8, 8, dtype=torch.bool))
    assert any("head dim 300" in r for r in reasons) and any("bool" in r for r in reasons)
    assert any("broadcastable" in r for r in
               K.attention_triton_unsupported_reasons(v, v, v, torch.zeros(3, 1, 1)))
    assert K.attention_triton_unsupported_reasons(v, v, v, torch.zeros(8)) == []


# ------------------------------------------------------------- the custom op (CPU: fused C++ or SDPA)
def _ops_attention():
    try:
        return importlib.import_module("sparsevit.ops.attention")
    except ImportError as exc:  # sparsevit.ops imports its sibling ops; one missing makes this skip loudly
        pytest.skip(f"sparsevit.ops not importable yet: {exc}")


def test_op_cpu_matches_reference_and_reports():
    A = _ops_attention()
    q, k, v = rand(2, 3, 49, 40, seed=1).float(), rand(2, 3, 49, 40, seed=2).float(), rand(2, 3, 49, 24, seed=3).float()
    bias = rand(1, 3, 49, 49, seed=4).float()
    out = A.attention(q, k, v, bias, scale=64 ** -0.5)
    torch.testing.assert_close(out, eager_attention(q, k, v, bias, 64 ** -0.5), rtol=1e-5, atol=1e-5)
    # default scale is Dqk ** -0.5; bool masks mean "attend where True"
    mask = rand(1, 1, 49, 49, seed=5) > -1.0
    mask[..., 0] = True
    out = A.attention(q, k, v, mask)
    ref = eager_attention(q, k, v, torch.zeros(mask.shape).masked_fill(~mask, float("-inf")), 40 ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # on CPU the reasons are those of the fused C++ kernel the op runs there
    from sparsevit.ops import cpu_attention

    assert A.attention_unsupported_reasons(q, k, v, bias) == cpu_attention.not_supported_reasons(q, k, v, bias)


def test_op_opcheck_compile_and_grad():
    A = _ops_attention()
    q = rand(1, 2, 9, 12, seed=1).float().requires_grad_()
    k = rand(1, 2, 9, 12, seed=2).float().requires_grad_()
    v = rand(1, 2, 9, 20, seed=3).float().requires_grad_()
    bias = rand(1, 2, 9, 9, seed=4).float().requires_grad_()
    torch.library.opcheck(torch.ops.sparsevit.attention.default, (q.detach(), k.detach(), v.detach(),
                                                                  bias.detach(), 0.3))
    A.attention(q, k, v, bias, 0.3).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v, bias)]
    qd, kd, vd, bd = (t.detach().double().requires_grad_() for t in (q, k, v, bias))
    eager_attention(qd, kd, vd, bd, 0.3).square().sum().backward()
    for g, t in zip(grads, (qd, kd, vd, bd)):
        torch.testing.assert_close(g.double(), t.grad, rtol=1e-4, atol=1e-5)
    compiled = torch.compile(lambda a, b, c: A.attention(a, b, c, None, 0.3), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q.detach(), k.detach(), v.detach()),
                               A.attention(q.detach(), k.detach(), v.detach(), None, 0.3))
