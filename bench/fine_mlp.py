"""Fused fine-grained MLP (``sparsevit.ops.fine_mlp``) vs two ``fine_linear`` calls, DeiT-S MLP shapes.

fc1 384->1536 + GELU, fc2 1536->384, unstructured masks, 1576 tokens (batch 8) by default; both
ways are called alternately in interleaved rounds and the median is reported. With ``--threads 1``
each call is timed in the calling thread's CPU time (``time.thread_time``), which a shared machine
disturbs less than a wall clock; other processes still evict caches, so numbers are indicative.

    python bench/fine_mlp.py --threads 1
    python bench/fine_mlp.py --threads 2 --tokens 197 --sparsity 0.9
    python bench/fine_mlp.py --threads 1 --token-tiles 64 80 96 128   # the fused op at other token tiles

``--token-tiles`` adds the fused op called with an explicit token tile (the op's ``token_tile``; 0 is the
kernel's default: AVX-512 fp32 80, bf16 128), each a column of ms, side by side in the same rounds.
"""
import argparse

import torch

from cpu_kernels import time_interleaved  # bench/ is the script's folder, so on sys.path
from sparsevit.formats.fine import FineSparseWeight
from sparsevit.ops.fine_linear import fine_linear
from sparsevit.ops.fine_mlp import fine_mlp


def _weight(out_f, in_f, sparsity, dtype, g):
    w = torch.randn(out_f, in_f, generator=g)
    return FineSparseWeight.from_dense(w.to(dtype), torch.rand(out_f, in_f, generator=g) >= sparsity)


def _fused_at_tile(x, w1, b1, w2, b2, tile):
    """The compiled fused op with an explicit token tile (fc1 GELU, as the ViT MLP runs it)."""
    return torch.ops.sparsevit_C.fine_mlp(x, w1.values, w1.col_indices, w1.seg_ptr, b1, w1.shape[0], w1.unit, 1,
                                          w2.values, w2.col_indices, w2.seg_ptr, b2, w2.shape[0], w1.shape[1],
                                          w2.unit, -1, tile)


def bench(tokens, sparsity, dtype, rounds, token_tiles=()):
    g = torch.Generator().manual_seed(0)
    w1, w2 = _weight(1536, 384, sparsity, dtype, g), _weight(384, 1536, sparsity, dtype, g)
    b1, b2 = torch.randn(1536, generator=g).to(dtype), torch.randn(384, generator=g).to(dtype)
    x = torch.randn(tokens, 384, generator=g).to(dtype)
    fns = {"two calls": lambda: fine_linear(fine_linear(x, w1, b1, "gelu"), w2, b2),
           "fused": lambda: fine_mlp(x, w1, b1, "gelu", w2, b2)}
    for tile in token_tiles:
        fns[f"tt={tile}"] = lambda tile=tile: _fused_at_tile(x, w1, b1, w2, b2, tile)
    return {k: 1e3 * t for k, t in time_interleaved(fns, rounds).items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=1576)
    ap.add_argument("--sparsity", nargs="+", type=float, default=[0.9, 0.7])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--token-tiles", nargs="*", type=int, default=[],
                    help="also time the fused op at these token tiles (multiples of the vector width)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    extra = [f"tt={t}" for t in args.token_tiles]
    print(f"threads={args.threads} tokens={args.tokens}\n| dtype | sparsity | two calls ms | fused ms | speed-up |"
          + "".join(f" fused {e} ms |" for e in extra) + "\n|---|---|---|---|---|" + "---|" * len(extra))
    for dtype in args.dtypes:
        for sp in args.sparsity:
            m = bench(args.tokens, sp, getattr(torch, dtype), args.rounds, args.token_tiles)
            print(f"| {dtype} | {sp:.2f} | {m['two calls']:.3f} | {m['fused']:.3f} | "
                  f"{m['two calls'] / m['fused']:.2f}x |" + "".join(f" {m[e]:.3f} |" for e in extra))


if __name__ == "__main__":
    main()
