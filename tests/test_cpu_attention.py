"""sparsevit::cpu_attention (fused CPU attention for pruned heads) against a float64 reference: odd
head counts and dims, Dqk != Dv, broadcast biases, fp32 and bf16 (error at most 2x that of torch's
own SDPA in the same dtype, plus one ulp of the output), every ISA level (AVX2, AVX-512, AVX-512 with
native bf16 dot products), NaN propagation, the work split over threads, opcheck.

Tiling edges the shapes cover: N below, at and past the 12-query block and the 64-key score tile
(1, 5, 12, 13, 37, 49, 70, 197), odd Dqk (bf16 channel pairs with a zero half), Dv of 1 to 4 vectors
with a partial last one."""
import pytest
import torch
import torch.nn.functional as F

from sparsevit import _ext
from sparsevit.ops.cpu_attention import cpu_attention, not_supported_reasons

HAS_CPP = _ext.has_op("attention_cpu")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws the same inputs whichever tests ran before it (their tolerances were set on
    those draws; an unseeded draw made one of them fail about once in 30 runs of this file)."""
    torch.manual_seed(0)
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"C++ extension: {_ext.unavailable_reason('attention_cpu')}")
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(1, 3, 5, 16, 24), (2, 6, 37, 64, 64), (1, 5, 49, 40, 48), (1, 1, 1, 8, 8), (1, 2, 70, 24, 16),
          (1, 2, 13, 17, 33), (1, 1, 12, 7, 5), (1, 2, 197, 64, 64), (1, 1, 65, 33, 56)]
ISAS = [0, 1, 2]  # avx2, avx512 (bf16 widened to fp32), avx512 + AVX512_BF16 (vdpbf16ps)


def _qkv(B, H, N, D, Dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, D, generator=g).to(dtype), torch.randn(B, H, N, D, generator=g).to(dtype),
            torch.randn(B, H, N, Dv, generator=g).to(dtype))


def _ref64(q, k, v, bias, scale):
    s = (q.double() @ k.double().transpose(-2, -1)) * scale
    if bias is not None:
        s = s + bias.double()
    return torch.softmax(s, -1) @ v.double()


def _check(out, q, k, v, bias, scale, what):
    ref = _ref64(q, k, v, bias, scale)
    mask = None if bias is None else bias.to(q.dtype).expand(*q.shape[:3], k.shape[2])
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # torch in the same dtype
    err = (out.double() - ref).abs().max().item()
    err_torch = (sdpa.double() - ref).abs().max().item()
    # 2 ulps of the output's scale: the kernel's exp and sum order differ from torch's, and over random
    # biases its error reached 1.2x of (2x torch's + 1 ulp) about once in a thousand draws
    tol = 2 * err_torch + 2 * torch.finfo(q.dtype).eps * ref.abs().max().item()
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert err <= tol, f"{what}: max err {err:.3g} > 2x torch err {err_torch:.3g} (+2 ulp)"


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64(dtype, shape):
    B, H, N, D, Dv = shape
    q, k, v = _qkv(*shape, dtype)
    g = torch.Generator().manual_seed(1)
    biases = [None, torch.randn(1, H, N, N, generator=g),  # rel-pos bias shared over the batch
              torch.randn(B, 1, N, N, generator=g).to(dtype),  # per-window mask shared over heads
              torch.randn(N, generator=g)]  # broadcast along rows
    for bias in biases:
        for scale in (D ** -0.5, 0.125):  # 0.125: the unpruned head dim's scale after pruning
            out = cpu_attention(q, k, v, bias, scale)
            _check(out, q, k, v, bias, scale, f"{dtype} {shape} bias={None if bias is None else tuple(bias.shape)}")


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_isa_level(isa, dtype):
    if not torch.ops.sparsevit_C.attention_cpu_isa(isa):
        pytest.skip(f"CPU lacks ISA level {isa}")
    for shape in SHAPES:
        q, k, v = _qkv(*shape, dtype, seed=2)
        bias = torch.randn(shape[2], shape[2], generator=torch.Generator().manual_seed(3))
        out = torch.ops.sparsevit_C.attention_cpu(q, k, v, bias, 0.3, isa)
        _check(out, q, k, v, bias, 0.3, f"isa={isa} {dtype} {shape}")


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_thread_split_gives_the_same_rows(dtype):
    """Batch 1 with 3 heads on 2 threads splits each head into query chunks (whole 12-query blocks):
    every row is computed the same way whatever the split, so outputs match bit for bit."""
    q, k, v = _qkv(1, 3, 50, 24, 40, dtype, seed=3)
    bias = torch.randn(1, 3, 50, 50)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(torch.ops.sparsevit_C.attention_cpu(q, k, v, bias, 0.2, -1))
    finally:
        torch.set_num_threads(before)
    _check(outs[0], q, k, v, bias, 0.2, f"{dtype} 1 thread")
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dv", [16, 64, 40])
def test_v_packed_from_qkv_rows(isa, dv):
    """V as rows of the qkv output (a row stride that is not its width, whole and partial vectors),
    fp32 and bf16: packed from where it lies, matches float64 on every ISA."""
    if not torch.ops.sparsevit_C.attention_cpu_isa(isa):
        pytest.skip(f"CPU lacks ISA level {isa}")
    B, N, H, D = 2, 29, 3, 24
    for dtype in DTYPES:
        qkv = torch.randn(B, N, H * (2 * D + dv) + 5).to(dtype)  # +5: rows not packed back to back
        q, k, v = qkv[..., :H * (2 * D + dv)].split((H * D, H * D, H * dv), -1)
        q, k, v = (t.view(B, N, H, -1).transpose(1, 2) for t in (q, k, v))
        bias = torch.randn(1, H, N, N)
        out = torch.ops.sparsevit_C.attention_cpu(q, k, v, bias, 0.3, isa)
        _check(out, q, k, v, bias, 0.3, f"isa={isa} {dtype} dv={dv}")


@needs_cpp
def test_strided_inputs_and_masks():
    """q/k/v as timm makes them (permuted views of one qkv tensor); a Swin-style -100 mask; a bool mask."""
    B, N, H, D = 2, 17, 3, 24
    qkv = torch.randn(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    mask = torch.zeros(B, 1, N, N).masked_fill(torch.rand(B, 1, N, N) < 0.3, -100.0)
    _check(cpu_attention(q, k, v, mask, 0.2), q, k, v, mask, 0.2, "strided + swin mask")
    keep = torch.rand(N, N) < 0.7
    keep.fill_diagonal_(True)
    add = torch.zeros(N, N).masked_fill(~keep, float("-inf"))
    _check(cpu_attention(q, k, v, keep, 0.2), q, k, v, add, 0.2, "bool mask")


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_last_key_vector_of_one_to_eight_keys(isa, dtype):
    """A last key vector with 1-8 keys runs with the queries in the lanes and a transpose on AVX-512,
    from head dims with at least 20 channel steps (fp32 24 and 40; bf16 pairs: 40), out of whichever
    K^T panel holds it: alone after whole 64-key panels (N = 65..72; 197 tokens end the same way, 5
    keys), the 4th of a full panel (N = 49..56: Swin's 49-token windows), the 2nd or 3rd of a narrower
    last panel (N = 81..88, 97..104). Every tail size against float64, with a per-row bias that masks
    some tail keys (-inf), short last query blocks, and one NaN key: its column poisons every row."""
    if not torch.ops.sparsevit_C.attention_cpu_isa(isa):
        pytest.skip(f"CPU lacks ISA level {isa}")
    g = torch.Generator().manual_seed(13)
    for N in [*range(65, 73), 49, 50, 53, 56, 81, 84, 88, 97, 101, 104]:
        for D in (24, 40):
            q, k, v = _qkv(2, 3, N, D, 48, dtype, seed=N + D)
            bias = torch.randn(1, 3, N, N, generator=g)
            bias[..., 1::3, N - 1] = float("-inf")
            out = torch.ops.sparsevit_C.attention_cpu(q, k, v, bias, D ** -0.5, isa)
            _check(out, q, k, v, bias, D ** -0.5, f"isa={isa} {dtype} N={N} D={D}")
    k[1, 2, N - 2, 3] = float("nan")  # a tail key of head (1, 2)
    out = torch.ops.sparsevit_C.attention_cpu(q, k, v, None, 0.2, isa)
    assert torch.isnan(out[1, 2]).all() and not torch.isnan(out[:1]).any() and not torch.isnan(out[1, :2]).any()


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
def test_head_dims_past_one_key_block(isa):
    """Score tiles of more channel steps than a key block has keys (Dqk 300 > 256) prefetch from a
    longer run of queue entries: every ISA, fp32 and bf16, against float64."""
    if not torch.ops.sparsevit_C.attention_cpu_isa(isa):
        pytest.skip(f"CPU lacks ISA level {isa}")
    for dtype in DTYPES:
        q, k, v = _qkv(2, 2, 41, 300, 40, dtype, seed=17)
        bias = torch.randn(1, 2, 41, 41)
        _check(torch.ops.sparsevit_C.attention_cpu(q, k, v, bias, 0.05, isa), q, k, v, bias, 0.05, f"isa={isa} {dtype}")


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_propagates_like_reference(dtype):
    q, k, v = _qkv(1, 2, 9, 16, 8, dtype)
    q[0, 0, 3, 5] = float("nan")   # one query row
    v[0, 1, 4, 2] = float("nan")   # one channel of every row of head 1
    ref = _ref64(q, k, v, None, 0.25)
    for isa in ISAS:
        if torch.ops.sparsevit_C.attention_cpu_isa(isa):
            out = torch.ops.sparsevit_C.attention_cpu(q, k, v, None, 0.25, isa)
            assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"isa={isa}"


def test_reasons_and_reference_fallback():
    q, k, v = _qkv(1, 2, 5, 8, 8, torch.float64)
    assert any("float64" in r for r in not_supported_reasons(q, k, v))
    out = cpu_attention(q, k, v, None, 0.3)  # reference path, float64 throughout
    assert torch.allclose(out, _ref64(q, k, v, None, 0.3), rtol=1e-12, atol=1e-12)
    qf, kf, vf = (t.float() for t in (q, k, v))
    assert any("broadcast" in r for r in not_supported_reasons(qf, kf, vf, torch.zeros(3, 5)))
    if HAS_CPP and torch.ops.sparsevit_C.attention_cpu_isa(-1):
        assert not_supported_reasons(qf, kf, vf, torch.zeros(5, 5)) == []
    with pytest.raises(ValueError, match="4-D"):
        cpu_attention(qf[0], kf, vf)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    q, k, v = _qkv(1, 3, 7, 16, 24, dtype)
    for bias in (None, torch.randn(1, 3, 7, 7)):
        torch.library.opcheck(torch.ops.sparsevit.cpu_attention.default, (q, k, v, bias, 0.25),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_sequences_use_several_key_blocks(dtype):
    """N past one online-softmax key block (256 keys on AVX-512, 128 on AVX2), with a bias whose
    first key block is fully masked for some rows (the running max must recover) and one row
    masked everywhere (NaN, as softmax gives)."""
    g = torch.Generator().manual_seed(5)
    B, H, N, D, Dv = 1, 2, 601, 24, 40
    q, k = (torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, H, N, Dv, generator=g).to(dtype)
    bias = torch.randn(1, H, N, N, generator=g)
    bias[:, :, 5:9, :300] = float("-inf")
    bias[:, :, 11, :] = float("-inf")
    for isa in ISAS:
        if not torch.ops.sparsevit_C.attention_cpu_isa(isa):
            continue
        out = torch.ops.sparsevit_C.attention_cpu(q, k, v, bias, 0.2, isa)
        ref = _ref64(q, k, v, bias, 0.2)
        assert torch.isnan(out[:, :, 11]).all() and torch.isnan(ref[:, :, 11]).all()
        keep = torch.ones(N, dtype=torch.bool)
        keep[11] = False
        err = (out[:, :, keep].double() - ref[:, :, keep]).abs().max().item()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert err <= tol * max(1.0, ref[:, :, keep].abs().max().item()), f"isa={isa} {dtype}: err {err:.3g}"


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_far_below_the_row_max_weighs_exactly_zero(dtype):
    """Finite biases far below the row max (Swin's -100 masks, -1e30, scores whose base-2 shift
    lands in and below fp32's subnormal range) give the weights softmax gives: exactly 0 where the
    reference's exp underflows, no NaN, every ISA level (AVX-512's exp2 has no clamp, see
    attention_cpu_impl.h)."""
    g = torch.Generator().manual_seed(7)
    B, H, N, D = 2, 3, 45, 16
    q, k, v = _qkv(B, H, N, D, D, dtype, seed=7)
    bias = torch.randn(1, H, N, N, generator=g)
    bias[..., 3::7] = -100.0
    bias[..., 5::11] = -1e30
    bias[..., 1::13] = -95.0  # 2^-137: subnormal before the row sum
    bias[..., 0, :] = -1e30
    bias[..., 0, 4] = 0.0  # one key left: that row copies v's row 4
    for isa in ISAS:
        if not torch.ops.sparsevit_C.attention_cpu_isa(isa):
            continue
        out = torch.ops.sparsevit_C.attention_cpu(q, k, v, bias, D ** -0.5, isa)
        assert not torch.isnan(out).any(), f"isa={isa}"
        _check(out, q, k, v, bias, D ** -0.5, f"isa={isa} {dtype}")
        assert torch.equal(out[:, :, 0], v[:, :, 4]), f"isa={isa}: a single unmasked key must copy its value row"


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_next_head_packed_ahead_whatever_the_guess(isa, dtype):
    """Each thread packs the head it guesses it takes next while it runs the current one; the guess
    is wrong whenever threads run out of step (more threads than cores here), and a wrong guess must
    only cost time: every thread count gives the same bits, which match float64. Shapes: a panel
    edge (N = 65: one full 64-key panel + 1 key) and DeiT-S's 197 tokens, more heads than threads."""
    if not torch.ops.sparsevit_C.attention_cpu_isa(isa):
        pytest.skip(f"CPU lacks ISA level {isa}")
    before = torch.get_num_threads()
    try:
        for shape in [(3, 4, 65, 24, 40), (2, 6, 197, 64, 64)]:
            q, k, v = _qkv(*shape, dtype, seed=11)
            bias = torch.randn(1, shape[1], shape[2], shape[2])
            outs = []
            for threads in (1, 2, 4, 5):
                torch.set_num_threads(threads)
                outs.append(torch.ops.sparsevit_C.attention_cpu(q, k, v, bias, 0.2, isa))
            _check(outs[0], q, k, v, bias, 0.2, f"isa={isa} {dtype} {shape}")
            for threads, out in zip((2, 4, 5), outs[1:]):
                assert torch.equal(out, outs[0]), f"isa={isa} {dtype} {shape}: {threads} threads differ"
    finally:
        torch.set_num_threads(before)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_back_to_back_calls_never_reuse_a_packed_head(dtype):
    """The per-thread scratch says which head a thread packed ahead; a new call (new inputs, likely the
    same scratch memory) must start with none: alternating inputs of one shape, each result checked."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        inputs = [_qkv(2, 3, 29, 16, 16, dtype, seed=s) for s in (20, 21)]
        for q, k, v in inputs * 3:
            _check(torch.ops.sparsevit_C.attention_cpu(q, k, v, None, 0.25, -1), q, k, v, None, 0.25,
                   f"{dtype} back to back")
    finally:
        torch.set_num_threads(before)
