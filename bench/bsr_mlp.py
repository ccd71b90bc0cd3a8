"""Fused block-sparse MLP (``sparsevit.ops.bsr_mlp``) vs two ``bsr_linear`` calls, DeiT-S MLP shapes.

fc1 384->1536 + GELU, fc2 1536->384, random block masks (32x32 at 70% sparsity by default), 1576
tokens (batch 8) and 197 (batch 1). Both ways are called straight through the compiled ops (as the
accelerated model calls them) in interleaved rounds; the median is reported. With ``--threads 1``
each call is timed in the thread's CPU time (``time.thread_time``), which a shared machine disturbs
less than a wall clock; other processes still evict caches, so numbers are indicative.

    python bench/bsr_mlp.py --threads 1
    python bench/bsr_mlp.py --threads 2 --tokens 197 --dtypes bfloat16
    python bench/bsr_mlp.py --threads 1 --group-tiles 1 2 4 8 16   # the fused op at other token groups
    python bench/bsr_mlp.py --threads 1 --model-plan blocks70 --batch 8   # whole DeiT-S forward, fused on vs off

``--group-tiles`` adds the fused op with an explicit number of token tiles per work item (the op's
``group_tiles``; 0, the default column, sizes the group so the hidden tile fits 256 KiB).
``--model-plan`` builds DeiT-S and a plan of bench/peers.py, accelerates it (the chooser decides per
MLP, as usual) and times whole forwards with every block-sparse MLP forced fused vs forced per layer.
"""
import argparse
import os
import sys

import torch

from cpu_kernels import time_interleaved  # bench/ is the script's folder, so on sys.path
from sparsevit.formats.bsr import BlockSparseWeight
from sparsevit.ops.bsr_mlp import FUSED_FLAG, not_fusable_reasons
from sparsevit.ops.linear_kernels import ACT_CODE


def _weight(out_f, in_f, block, sparsity, dtype, g):
    bh, bw = block
    keep = torch.rand(out_f // bh, in_f // bw, generator=g) >= sparsity
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return BlockSparseWeight.from_dense(torch.randn(out_f, in_f, generator=g).to(dtype), block=block, mask=mask)


def _linear(x, w, b, act):
    return torch.ops.sparsevit_C.bsr_linear(x, w.packed, w.col_indices, w.crow_indices, b, w.shape[0], w.shape[1],
                                            *w.block, ACT_CODE[act], -1)


def _fused(x, w1, b1, w2, b2, group_tiles=0):
    return torch.ops.sparsevit_C.bsr_mlp(x, w1.packed, w1.col_indices, w1.crow_indices, b1, w1.shape[0], *w1.block,
                                         ACT_CODE["gelu"], w2.packed, w2.col_indices, w2.crow_indices, b2,
                                         w2.shape[0], w1.shape[1], *w2.block, -1, group_tiles)


def bench(tokens, block, sparsity, dtype, rounds, group_tiles=()):
    g = torch.Generator().manual_seed(0)
    w1, w2 = _weight(1536, 384, block, sparsity, dtype, g), _weight(384, 1536, block, sparsity, dtype, g)
    b1, b2 = torch.randn(1536, generator=g).to(dtype), torch.randn(384, generator=g).to(dtype)
    x = torch.randn(tokens, 384, generator=g).to(dtype)
    fns = {"two calls": lambda: _linear(_linear(x, w1, b1, "gelu"), w2, b2, "none"),
           "fused": lambda: _fused(x, w1, b1, w2, b2)}
    for n in group_tiles:
        fns[f"g={n}"] = lambda n=n: _fused(x, w1, b1, w2, b2, n)
    assert torch.equal(fns["fused"](), fns["two calls"]()), "fused output differs from two bsr_linear calls"
    return {k: 1e3 * t for k, t in time_interleaved(fns, rounds).items()}


def model_ab(plan_name, batch, dtype, rounds):
    """ms of whole forwards with the block-sparse MLPs fused / per layer, and how many the chooser fused."""
    import peers  # bench/ is on sys.path
    import sparsevit
    from sparsevit.runtime.linear import SparseLinear

    dense = peers.build_model("deit_small_patch16_224", None, {})
    fast = sparsevit.accelerate(dense, peers.PLANS[plan_name][0](dense), dtype=dtype, batch_hint=batch)
    pairs = [(b.mlp.fc1, b.mlp.fc2) for b in fast.blocks
             if all(isinstance(m, SparseLinear) and m.kind == "bsr" for m in (b.mlp.fc1, b.mlp.fc2))]
    chosen = sum(bool(f1.__dict__.get(FUSED_FLAG)) for f1, _ in pairs)
    x = torch.randn(batch, 3, 224, 224, dtype=dtype)
    fusable = [p for p in pairs if not not_fusable_reasons(x.new_empty(1, p[0].in_features), p[0].weight, p[1].weight)]

    def forward(fused):
        for f1, _ in fusable:
            f1.__dict__[FUSED_FLAG] = fused
        return fast(x)

    with torch.no_grad():
        assert torch.equal(forward(True), forward(False)), "fused forward differs from the per-layer one"
        ms = {k: 1e3 * t for k, t in time_interleaved({"per layer": lambda: forward(False),
                                                      "fused": lambda: forward(True)}, rounds).items()}
    return ms, chosen, len(fusable)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", nargs="+", type=int, default=[1576, 197])
    ap.add_argument("--block", nargs=2, type=int, default=[32, 32])
    ap.add_argument("--sparsity", nargs="+", type=float, default=[0.7])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--group-tiles", nargs="*", type=int, default=[],
                    help="also time the fused op with these token tiles per work item")
    ap.add_argument("--model-plan", default=None, help="a bench/peers.py plan: time the whole DeiT-S forward")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model_plan:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        print(f"threads={args.threads} plan={args.model_plan} batch={args.batch}\n"
              "| dtype | per-layer MLPs ms | fused MLPs ms | speed-up | chooser fused |\n|---|---|---|---|---|")
        for dtype in args.dtypes:
            ms, chosen, n = model_ab(args.model_plan, args.batch, getattr(torch, dtype), args.rounds)
            print(f"| {dtype} | {ms['per layer']:.2f} | {ms['fused']:.2f} | {ms['per layer'] / ms['fused']:.3f}x | "
                  f"{chosen} of {n} |", flush=True)
        return
    extra = [f"g={n}" for n in args.group_tiles]
    print(f"threads={args.threads} block={args.block[0]}x{args.block[1]}\n"
          "| dtype | tokens | sparsity | two calls ms | fused ms | speed-up |"
          + "".join(f" fused {e} ms |" for e in extra)
          + "\n|---|---|---|---|---|---|" + "---|" * len(extra))
    for dtype in args.dtypes:
        for tokens in args.tokens:
            for sp in args.sparsity:
                m = bench(tokens, tuple(args.block), sp, getattr(torch, dtype), args.rounds, args.group_tiles)
                print(f"| {dtype} | {tokens} | {sp:.2f} | {m['two calls']:.3f} | {m['fused']:.3f} | "
                      f"{m['two calls'] / m['fused']:.2f}x |" + "".join(f" {m[e]:.3f} |" for e in extra), flush=True)


if __name__ == "__main__":
    main()
