"""GPU-only checks (skipped without CUDA): Triton and CUDA C++ BSR linear, Triton attention, the
registered ops, the per-layer chooser and CUDA graphs. Same accuracy rule as the interpreter tests:
at most 2x PyTorch's own error in the same dtype against a float64 reference."""
import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = "cuda"


def _check(out, ref64, torch_out, what):
    err = (out.double() - ref64).abs().max().item()
    torch_err = (torch_out.double() - ref64).abs().max().item()
    bound = max(2 * torch_err, 4 * torch.finfo(out.dtype).eps * ref64.abs().max().item())
    assert err <= bound, f"{what}: err {err:.3e} > bound {bound:.3e} (torch {torch_err:.3e})"


def _weight(out_f, in_f, block, density, seed):
    from sparsevit.formats import BlockSparseWeight

    g = torch.Generator().manual_seed(seed)
    bh, bw = block
    keep = torch.rand(-(-out_f // bh), -(-in_f // bw), generator=g) < density
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:out_f, :in_f]
    dense = torch.randn(out_f, in_f, generator=g, dtype=torch.float64) * mask
    return BlockSparseWeight.from_dense(dense, block=block), dense


def _act(y, act):
    return y if act is None else F.gelu(y, approximate="tanh" if act == "gelu_tanh" else "none")


@pytest.mark.parametrize("backend", ["triton_bsr", "cuda_bsr"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 64), (32, 64)])
@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh"])
@pytest.mark.parametrize("tokens", [1, 197, 397])
def test_bsr_linear_gpu(backend, dtype, block, act, tokens):
    from sparsevit.ops.bsr import bsr_linear
    from sparsevit.ops.linear_kernels import KernelInput, get_kernel

    w, dense = _weight(300, 200, block, 0.4, seed=tokens)
    x = torch.randn(tokens, 200, dtype=torch.float64)
    b = torch.randn(300, dtype=torch.float64)
    xd = x.to(DEV, dtype)
    reasons = get_kernel(backend).not_supported_reasons(
        KernelInput("cuda", dtype, f"bsr:{block[0]}x{block[1]}", act, xd.device.index))
    if reasons:
        pytest.skip("; ".join(reasons))
    out = bsr_linear(xd, w.to(device=DEV, dtype=dtype), b.to(DEV, dtype), act, kernel=backend)
    torch.cuda.synchronize()
    ref = _act(F.linear(x, dense, b), act)
    _check(out.cpu(), ref, _act(F.linear(xd, dense.to(DEV, dtype), b.to(DEV, dtype)), act).cpu(),
           f"{backend} {dtype} {block} {act} {tokens}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(8, 3, 49, 40, 24), (2, 12, 197, 64, 64), (2, 5, 197, 48, 56)])
def test_attention_gpu(dtype, shape):
    from sparsevit.ops.attention import attention, attention_unsupported_reasons

    B, H, N, dqk, dv = shape
    q, k = torch.randn(B, H, N, dqk, dtype=torch.float64), torch.randn(B, H, N, dqk, dtype=torch.float64)
    v, bias = torch.randn(B, H, N, dv, dtype=torch.float64), torch.randn(1, H, N, N, dtype=torch.float64)
    c = lambda t: t.to(DEV, dtype)  # noqa: E731
    assert attention_unsupported_reasons(c(q), c(k), c(v), c(bias)) == []
    out = attention(c(q), c(k), c(v), c(bias), scale=64 ** -0.5)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=64 ** -0.5)
    a = (c(q) * 64 ** -0.5) @ c(k).transpose(-2, -1) + c(bias)
    _check(out.cpu(), ref, (a.softmax(-1) @ c(v)).cpu(), f"attention {dtype} {shape}")


def test_registered_bsr_op_and_chooser():
    from sparsevit.runtime.linear import LayerSpec, choose_linear

    lin = torch.nn.Linear(384, 768).to(DEV, torch.float16)
    w, _ = _weight(768, 384, (32, 32), 0.2, seed=0)
    mask = (w.to_dense() != 0).to(DEV)
    mod, dec = choose_linear(LayerSpec("fc1", lin.weight.detach(), lin.bias.detach(), mask, "gelu", 197))
    assert dec.reason and dec.est_ms, dec
    x = torch.randn(2, 197, 384, device=DEV, dtype=torch.float16)
    ref = F.gelu(F.linear(x.float(), (lin.weight * mask).float(), lin.bias.float()))
    torch.testing.assert_close(mod(x).float(), ref, rtol=2e-2, atol=2e-2)


def test_cuda_graph_replays_and_checks_shapes():
    from sparsevit.runtime.cuda_graph import capture_cuda_graph

    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(DEV)
    x = torch.randn(4, 32, device=DEV)
    g = capture_cuda_graph(model, x)
    for _ in range(3):
        y = torch.randn(4, 32, device=DEV)
        torch.testing.assert_close(g(y), model(y))
    with pytest.raises(ValueError, match="signature"):
        g(torch.randn(5, 32, device=DEV))
    with pytest.raises(ValueError, match="cpu"):
        capture_cuda_graph(model, torch.randn(4, 32))
