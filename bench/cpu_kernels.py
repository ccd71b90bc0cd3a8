"""CPU kernel benchmark: fine-grained sparse linear, dense candidates and fused attention vs torch.

Peak: ``torch.ops.sparsevit_C.peak_gflops`` runs 16 independent ``vfmadd231ps zmm`` (fp32) or
``vdpbf16ps zmm`` (bf16) chains in registers (no memory operands) on each thread for 0.2 s of that
thread's CPU time; kept work is reported as % of that peak for the dtype at hand.

Linear, per DeiT-S shape x tokens x pattern x sparsity x dtype, side by side in interleaved rounds:
the dense candidates of ``ops.dense_cpu`` (``torch_linear`` = MKL fp32 / oneDNN bf16,
``onednn_packed``, ``sparsevit_bsr_full``) on the masked weight, and the fine-grained kernel
(``ops.fine_linear``). Reported: median ms, the fine kernel's speed-up vs the fastest dense
candidate, and % of peak (dense: 2*out*in*T flops; fine: 2*stored weights*T, i.e. kept work).
``fixed ms`` times the fine kernel on an all-zero weight of the same shape: the per-call cost that
does not shrink with sparsity (packing x into token tiles, the row/chunk loop, the transposing
store of y and the dispatch).

Attention: ``F.scaled_dot_product_attention`` vs ``sparsevit_C::attention_cpu`` at ViT shapes (N=197, 50, 577;
H=6 or 3 after head pruning; head dims 64/48/40/32/24/16), optionally with an older build of the
kernel side by side (``--attn-baseline LIB.so:NS``).

    python bench/cpu_kernels.py --threads 1            # short default run
    python bench/cpu_kernels.py --threads 1 --shapes qkv proj fc1 fc2 --tokens 197 1576 --tiles 1 4 8

With ``--threads 1`` every op runs on the calling thread, so each call is timed in that thread's CPU
time (``time.thread_time``): on a shared machine a wall clock counts the time spent waiting for a
core. Other processes still evict caches; timings are indicative only, compare ratios within a run.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparsevit.formats.fine import FineSparseWeight  # noqa: E402
from sparsevit.ops.dense_cpu import dense_candidates  # noqa: E402
from sparsevit.ops.cpu_attention import cpp_kernel_name as attn_kernel_name  # noqa: E402
from sparsevit.ops.fine_linear import cpp_kernel_name, fine_linear, not_supported_reasons  # noqa: E402

SHAPES = {"qkv": (384, 1152), "proj": (384, 384), "fc1": (384, 1536), "fc2": (1536, 384)}  # (in, out)


def _clock():
    """Thread CPU time when torch runs on this thread alone, else wall time."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def time_interleaved(fns, rounds, warmup=2):
    """name -> median seconds, calling every fn once per round (background load hits all alike)."""
    clock = _clock()
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {n: [] for n in fns}
    for _ in range(rounds):
        for n, f in fns.items():
            t0 = clock()
            f()
            times[n].append(clock() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def measure_peak(threads):
    """GFLOP/s of the register-resident FMA / vdpbf16ps loops (0 where the op or ISA is missing)."""
    if not hasattr(torch.ops.sparsevit_C, "peak_gflops"):
        return {"float32": 0.0, "bfloat16": 0.0}
    return {d: torch.ops.sparsevit_C.peak_gflops(d, threads, 0.2) for d in ("float32", "bfloat16")}


def make_mask(out_f, in_f, tile, sparsity, g):
    keep = torch.rand(out_f, -(-in_f // tile), generator=g) >= sparsity
    return keep.repeat_interleave(tile, dim=1)[:, :in_f]


def dense_methods(w, dtype):
    """name -> module for every supported dense candidate of the (masked) weight."""
    return {c.name: c.build() for c in dense_candidates(w, None, None, dtype=dtype) if not c.not_supported_reasons}


def _pct(flops, seconds, peak):
    return f"{100 * flops / seconds / 1e9 / peak:.0f}%" if peak else "-"


def bench_dense(args, peaks):
    print("\n## Dense candidates, ms median (% of peak)")
    print("| dtype | shape | tokens | " + " | ".join(("torch_linear", "onednn_packed", "sparsevit_bsr_full")) + " |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for dtype in args.dtypes:
        dt = getattr(torch, dtype)
        for name in args.shapes:
            in_f, out_f = SHAPES[name]
            mods = dense_methods(torch.randn(out_f, in_f, generator=g), dt)
            for T in args.tokens:
                x = torch.randn(T, in_f, generator=g).to(dt)
                t = time_interleaved({n: (lambda m=m: m(x)) for n, m in mods.items()}, args.rounds)
                cells = [f"{t[n] * 1e3:.3f} ({_pct(2 * in_f * out_f * T, t[n], peaks[dtype])})" if n in t else "-"
                         for n in ("torch_linear", "onednn_packed", "sparsevit_bsr_full")]
                print(f"| {dtype} | {name} {in_f}->{out_f} | {T} | " + " | ".join(cells) + " |")


def bench_linear(args, peaks):
    g = torch.Generator().manual_seed(0)
    print(f"\n## Fine-grained linear ({cpp_kernel_name()}), ms median; x = speed-up vs the fastest dense "
          f"candidate; % of peak: dense of all MACs, fine of kept MACs; fixed ms: fine on an all-zero weight")
    print("| dtype | shape | tokens | pattern | sparsity | fastest dense | dense ms | fine ms | fine x | "
          "dense % peak | fine kept % peak | fixed ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        dt = getattr(torch, dtype)
        for name in args.shapes:
            in_f, out_f = SHAPES[name]
            w = torch.randn(out_f, in_f, generator=g)
            for T in args.tokens:
                x = torch.randn(T, in_f, generator=g).to(dt)
                for tile in args.tiles:
                    for sp in args.sparsity:
                        mask = make_mask(out_f, in_f, tile, sp, g)
                        wm = w * mask
                        fns = {n: (lambda m=m: m(x)) for n, m in dense_methods(wm, dt).items()}
                        fw = FineSparseWeight.from_dense(wm.to(dt), mask, tile=tile)
                        fns["fine"] = lambda fw=fw: fine_linear(x, fw)
                        empty = FineSparseWeight.from_dense(torch.zeros_like(wm, dtype=dt), tile=tile)
                        fns["fixed"] = lambda empty=empty: fine_linear(x, empty)
                        reasons = not_supported_reasons(x, fw)
                        t = time_interleaved(fns, args.rounds)
                        best = min((n for n in t if n not in ("fine", "fixed")), key=t.get)
                        note = f" (reference: {'; '.join(reasons)})" if reasons else ""
                        print(f"| {dtype} | {name} {in_f}->{out_f} | {T} | 1x{tile} | {sp:.2f} | {best} | "
                              f"{t[best] * 1e3:.3f} | {t['fine'] * 1e3:.3f} | {t[best] / t['fine']:.2f} | "
                              f"{_pct(2 * in_f * out_f * T, t[best], peaks[dtype])} | "
                              f"{_pct(2 * fw.nnz * T, t['fine'], peaks[dtype])}{note} | {t['fixed'] * 1e3:.3f} |")


ATTN_SHAPES = [(6, 197, 64), (3, 197, 64), (6, 197, 32), (3, 197, 48), (3, 197, 40), (3, 197, 24), (3, 197, 16),
               (6, 50, 64), (6, 577, 64), (3, 577, 64)]  # (heads, tokens, head dim)


def _attention_baseline(spec):
    """``LIB.so:NAMESPACE`` -> the ``attention_cpu`` op of an older build (same schema), or None."""
    if not spec:
        return None
    lib, ns = spec.rsplit(":", 1)
    torch.ops.load_library(lib)
    return getattr(torch.ops, ns).attention_cpu


def bench_attention(args, peaks):
    """SDPA vs the fused kernel's op (and an older build of it with --attn-baseline), interleaved
    rounds; both kernels are called as raw ops (the ``cpu_attention`` wrapper adds tens of us of Python
    per call); % of peak counts the 4*B*H*N*N*D flops of Q.K^T and P.V."""
    base = _attention_baseline(args.attn_baseline)
    print(f"\n## Attention (fused kernel: {attn_kernel_name()}), ms median (% of peak)")
    print("| dtype | batch | heads | tokens | head dim | SDPA | baseline | sparsevit | vs SDPA | vs baseline |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        dt = getattr(torch, dtype)
        for B in args.batches:
            for H, N, D in ATTN_SHAPES:
                q, k, v = (torch.randn(B, H, N, D).to(dt) for _ in range(3))
                fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=0.125),
                       "ours": lambda: torch.ops.sparsevit_C.attention_cpu(q, k, v, None, 0.125, -1)}
                if base is not None:
                    fns["base"] = lambda: base(q, k, v, None, 0.125, -1)
                t = time_interleaved(fns, args.rounds)
                cell = {n: f"{t[n] * 1e3:.3f} ({_pct(4 * B * H * N * N * D, t[n], peaks[dtype])})" for n in t}
                vs_base = f"{t['base'] / t['ours']:.2f}" if "base" in t else "-"
                print(f"| {dtype} | {B} | {H} | {N} | {D} | {cell['sdpa']} | {cell.get('base', '-')} | {cell['ours']} | "
                      f"{t['sdpa'] / t['ours']:.2f} | {vs_base} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--shapes", nargs="+", default=["qkv", "fc2"], choices=sorted(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[197])
    ap.add_argument("--tiles", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--sparsity", nargs="+", type=float, default=[0.7, 0.9])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--skip", nargs="*", default=[], choices=["dense", "linear", "attention"])
    ap.add_argument("--attn-baseline", default=None, metavar="LIB.so:NS",
                    help="an older build of the attention op (its TORCH_LIBRARY renamed to NS) timed alongside")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peaks = measure_peak(torch.get_num_threads())
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}; register-loop peak: fp32 "
          f"{peaks['float32']:.0f} GF/s, bf16 (vdpbf16ps) {peaks['bfloat16']:.0f} GF/s")
    if "dense" not in args.skip:
        bench_dense(args, peaks)
    if "linear" not in args.skip:
        bench_linear(args, peaks)
    if "attention" not in args.skip:
        bench_attention(args, peaks)


if __name__ == "__main__":
    main()
