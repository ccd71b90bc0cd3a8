"""Packed formats: exact round trips, layouts, (de)serialisation, clear errors."""
import pytest
import torch

from sparsevit.formats import BlockSparseWeight, NMSparseWeight, pack_values, packed_block_rows

BLOCKS = [(1, 8), (8, 16), (16, 16), (32, 32), (64, 64), (24, 40), (3, 5), (48, 8)]


def _rand(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) + 0.1).to(dtype)  # nonzero almost surely


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bsr_roundtrip_with_mask(block, dtype):
    w = _rand((200, 300), dtype)
    mask = torch.rand(200, 300, generator=torch.Generator().manual_seed(1)) < 0.05
    bs = BlockSparseWeight.from_dense(w, block=block, mask=mask)
    assert torch.equal(bs.to_dense(), w * mask), "to_dense() must reproduce dense*mask exactly"
    assert bs.col_indices.dtype == torch.int32 and bs.crow_indices.dtype == torch.int32
    assert bs.values.shape == (bs.nnz_blocks, *block) and bs.dtype == dtype
    assert bs.shape == (200, 300) and bs.block == block
    crow = bs.crow_indices.long()
    assert crow[0] == 0 and crow[-1] == bs.nnz_blocks and bool((crow[1:] >= crow[:-1]).all())
    # every kept block holds a True; every True lies in a kept block
    nbr, nbc = -(-200 // block[0]), -(-300 // block[1])
    assert 0 < bs.density <= 1 and abs(bs.density - bs.nnz_blocks / (nbr * nbc)) < 1e-12


@pytest.mark.parametrize("block", [(32, 32), (16, 16), (7, 9)])
def test_bsr_roundtrip_from_zeros_in_weight(block):
    w = _rand((100, 70))
    w[32:64] = 0  # whole block rows for every block height tried
    w[:, 5:20] = 0
    bs = BlockSparseWeight.from_dense(w, block=block)
    assert torch.equal(bs.to_dense(), w)
    assert bs.density < 1.0


def test_bsr_mask_keeps_block_even_if_values_zero():
    w = torch.zeros(64, 64)
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[0, 0] = True
    bs = BlockSparseWeight.from_dense(w, block=(32, 32), mask=mask)
    assert bs.nnz_blocks == 1 and torch.equal(bs.to_dense(), w)
    empty = BlockSparseWeight.from_dense(w, block=(32, 32), mask=torch.zeros_like(mask))
    assert empty.nnz_blocks == 0 and torch.equal(empty.to_dense(), w) and empty.density == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [(32, 32), (24, 40), (1, 8), (3, 5)])
def test_packed_layout(dtype, block):
    bh, bw = block
    bs = BlockSparseWeight.from_dense(_rand((100, 90), dtype), block=block)
    p, v = bs.packed, bs.values
    bhp = packed_block_rows(bh)
    assert bhp >= bh and (bhp in (1, 2, 4, 8) or bhp % 16 == 0)
    if dtype == torch.bfloat16:
        assert p.shape == (bs.nnz_blocks, (bw + 1) // 2, bhp, 2)
        b, i, j = bs.nnz_blocks - 1, bh - 1, bw - 1
        assert p[b, j // 2, i, j % 2] == v[b, i, j]
    else:
        assert p.shape == (bs.nnz_blocks, bw, bhp, 1)
        assert p[-1, bw - 1, bh - 1, 0] == v[-1, bh - 1, bw - 1]
    # padding rows are zero
    assert not bool(p[:, :, bh:].any())
    assert torch.equal(pack_values(v), p)


def test_to_repacks_and_tensors_roundtrip():
    w = _rand((96, 128))
    bs = BlockSparseWeight.from_dense(w, block=(32, 32), mask=torch.rand(96, 128) < 0.1)
    b16 = bs.to(dtype=torch.bfloat16)
    assert b16.packed.shape[-1] == 2 and b16.packed.dtype == torch.bfloat16
    assert torch.equal(b16.to_dense(), bs.to_dense().bfloat16())
    d = bs.to_tensors()
    assert all(isinstance(t, torch.Tensor) for t in d.values())
    back = BlockSparseWeight.from_tensors(d)
    assert back.shape == bs.shape and back.block == bs.block
    assert torch.equal(back.to_dense(), bs.to_dense()) and torch.equal(back.packed, bs.packed)


def test_bsr_errors():
    with pytest.raises(ValueError, match="block"):
        BlockSparseWeight.from_dense(torch.ones(4, 4), block=(0, 8))
    with pytest.raises(ValueError, match="mask shape"):
        BlockSparseWeight.from_dense(torch.ones(4, 4), block=(2, 2), mask=torch.ones(4, 5))
    with pytest.raises(ValueError, match="2-D"):
        BlockSparseWeight.from_dense(torch.ones(4), block=(2, 2))


# ---- N:M ----------------------------------------------------------------------------------------
def _nm_weight(out_f, in_f, n, m, dtype=torch.float32, seed=0):
    w = _rand((out_f, in_f), dtype, seed)
    g = w.reshape(out_f, in_f // m, m)
    idx = g.abs().float().topk(n, dim=-1).indices
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return (g * keep).reshape(out_f, in_f)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nm_roundtrip(n, m, dtype):
    w = _nm_weight(24, 64, n, m, dtype)
    w[0, :m] = 0  # a group with fewer than n nonzeros
    nm = NMSparseWeight.from_dense(w, n=n, m=m)
    assert nm.values.shape == (24, 64 // m * n) and nm.indices.dtype == torch.uint8
    assert torch.equal(nm.to_dense(), w)
    back = NMSparseWeight.from_tensors(nm.to_tensors())
    assert torch.equal(back.to_dense(), w) and back.density == n / m


def test_nm_errors():
    w = _rand((8, 16))
    with pytest.raises(ValueError, match="not 2:4 sparse.*row 0"):
        NMSparseWeight.from_dense(w, 2, 4)
    with pytest.raises(ValueError, match="multiple of m=4"):
        NMSparseWeight.from_dense(_rand((8, 18)), 2, 4)
    nm = NMSparseWeight.from_dense(_nm_weight(8, 16, 2, 4, torch.float16))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            nm.to_semi_structured()
