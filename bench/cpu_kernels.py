"""CPU kernel benchmark: fine-grained sparse linear and fused attention against what torch offers.

Linear, per DeiT-S shape x tokens x sparsity pattern x dtype, side by side in interleaved rounds:
dense torch ``F.linear`` (MKL / oneDNN), ``torch.ops.mkldnn._linear_pointwise`` when this torch has
it, sparsevit's BSR kernel (``ops.bsr_linear``, block 1x8 holding the same mask) and the fine-grained
kernel (``ops.fine_linear``). Reported: median ms after warm-up, speed-up vs dense, and GFLOP/s of
*kept* work (2 x stored weights x tokens / time) next to the machine's peak.

Peak: the rate of a large dense GEMM in fp32 (a lower bound: MKL takes no AVX-512 path on AMD) and
half the rate of the same GEMM in bf16 (oneDNN's vdpbf16ps path runs near its peak, and one bf16
dot-pair instruction does twice the fp32 FMA work), both printed; the larger is used as "peak".

Attention: ``F.scaled_dot_product_attention`` vs ``ops.cpu_attention`` at DeiT-S shapes (N=197,
H=6 or 3 after head pruning, D=64 or 32).

    python bench/cpu_kernels.py                 # short default run (< 1 minute)
    python bench/cpu_kernels.py --threads 2 --tokens 197 1576 --sparsity 0.7 0.9 0.95 --rounds 15

Timings on a shared machine are indicative only; the median over interleaved rounds damps, but
does not remove, interference from other processes.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparsevit.formats import BlockSparseWeight  # noqa: E402
from sparsevit.formats.fine import FineSparseWeight  # noqa: E402
from sparsevit.ops.bsr import bsr_linear  # noqa: E402
from sparsevit.ops.cpu_attention import cpp_kernel_name as attn_kernel_name, cpu_attention  # noqa: E402
from sparsevit.ops.fine_linear import cpp_kernel_name, fine_linear, not_supported_reasons  # noqa: E402

SHAPES = {"qkv": (384, 1152), "proj": (384, 384), "fc1": (384, 1536), "fc2": (1536, 384)}  # (in, out)


def time_interleaved(fns, rounds, warmup=2):
    """name -> median seconds, calling every fn once per round (background load hits all alike)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {n: [] for n in fns}
    for _ in range(rounds):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def measure_peak():
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    t = time_interleaved({"f32": lambda: a @ b}, 5)["f32"]
    f32 = 2 * 2048 ** 3 / t / 1e9
    ab, bb = a.bfloat16(), b.bfloat16()
    t = time_interleaved({"bf16": lambda: ab @ bb}, 5)["bf16"]
    bf16_half = 2 * 2048 ** 3 / t / 1e9 / 2
    return f32, bf16_half


def make_mask(out_f, in_f, tile, sparsity, g):
    keep = torch.rand(out_f, -(-in_f // tile), generator=g) >= sparsity
    return keep.repeat_interleave(tile, dim=1)[:, :in_f]


def linear_methods(x, w, mask, tile):
    wm = (w * mask).to(x.dtype)
    fns = {"dense": lambda: F.linear(x, wm)}
    mk = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if mk is not None and torch.backends.mkldnn.is_available():
        try:
            mk(x, wm, None, "none", [], "")
            fns["mkldnn"] = lambda: mk(x, wm, None, "none", [], "")
        except RuntimeError:
            pass
    bw = BlockSparseWeight.from_dense(wm, block=(1, 8), mask=mask)
    fns["bsr_1x8"] = lambda: bsr_linear(x, bw)
    fw = FineSparseWeight.from_dense(wm, mask, tile=tile)
    fns["fine"] = lambda: fine_linear(x, fw)
    return fns, fw


def bench_linear(args, peak):
    g = torch.Generator().manual_seed(0)
    print(f"\n## Linear (fine kernel: {cpp_kernel_name()}), ms median; x = speed-up vs dense; GF/s of kept work "
          f"(peak {peak:.0f})")
    print("| dtype | shape | tokens | pattern | sparsity | dense | mkldnn | bsr 1x8 | fine | fine x | fine GF/s | % peak |")
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
                        fns, fw = linear_methods(x, w, mask, tile)
                        reasons = not_supported_reasons(x, fw)
                        t = time_interleaved(fns, args.rounds)
                        gf = 2 * fw.nnz * T / t["fine"] / 1e9
                        cell = {n: f"{t[n] * 1e3:.3f}" if n in t else "-" for n in ("dense", "mkldnn", "bsr_1x8", "fine")}
                        print(f"| {dtype} | {name} {in_f}->{out_f} | {T} | 1x{tile} | {sp:.2f} | {cell['dense']} | "
                              f"{cell['mkldnn']} | {cell['bsr_1x8']} | {cell['fine']} | {t['dense'] / t['fine']:.2f} | "
                              f"{gf:.0f} | {100 * gf / peak:.0f}%{' (reference: ' + '; '.join(reasons) + ')' if reasons else ''} |")


def bench_attention(args):
    print(f"\n## Attention (fused kernel: {attn_kernel_name()}), N=197, ms median")
    print("| dtype | batch | heads | head dim | SDPA | sparsevit | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        dt = getattr(torch, dtype)
        for B in args.batches:
            for H, D in ((6, 64), (3, 64), (6, 32)):
                q, k, v = (torch.randn(B, H, 197, D).to(dt) for _ in range(3))
                t = time_interleaved({"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=0.125),
                                      "ours": lambda: cpu_attention(q, k, v, None, 0.125)}, args.rounds)
                print(f"| {dtype} | {B} | {H} | {D} | {t['sdpa'] * 1e3:.3f} | {t['ours'] * 1e3:.3f} | "
                      f"{t['sdpa'] / t['ours']:.2f} |")


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
    ap.add_argument("--skip", nargs="*", default=[], choices=["linear", "attention"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    f32, bf16_half = measure_peak()
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}; peak estimate: dense fp32 GEMM "
          f"{f32:.0f} GF/s, bf16 GEMM / 2 = {bf16_half:.0f} GF/s")
    if "linear" not in args.skip:
        bench_linear(args, max(f32, bf16_half))
    if "attention" not in args.skip:
        bench_attention(args)


if __name__ == "__main__":
    main()
