"""GPU kernel benchmark: block-sparse linear (Triton, CUDA C++) vs cuBLAS dense and torch BSR.

ViT-B MLP shapes (fc1 768->3072, fc2 3072->768), tokens = 197 x batch (default batch 64), bf16,
32x32 and 64x64 blocks at 50/80/90% block sparsity, bias + GELU fused for fc1. Each timing is the
median of ``--reps`` runs after ``--warmup`` runs, measured with CUDA events. Also times the Triton
attention kernel vs SDPA for pruned-head shapes. Writes JSON and Markdown.

    python bench/gpu_kernels.py --batch 64 --out bench/out/gpu_kernels

Needs a CUDA GPU; prints why and exits 2 otherwise. (No numbers were measured when this was written:
the development machine had no GPU.)
"""
import argparse
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F

from sparsevit.runtime.linear import median_ms as _median_ms


def median_ms(fn, warmup: int, reps: int) -> float:
    return _median_ms(fn, "cuda", reps=reps, warmup=warmup)


def block_masked_weight(out_f, in_f, block, sparsity, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    bh, bw = block
    keep = torch.rand(out_f // bh, in_f // bw, generator=g) >= sparsity
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return (torch.randn(out_f, in_f, generator=g) * 0.02 * mask).to("cuda", dtype)


def bench_linear(args):
    from sparsevit.formats import BlockSparseWeight
    from sparsevit.ops.bsr import bsr_linear
    from sparsevit.ops.linear_kernels import KernelInput, get_kernel

    dtype = getattr(torch, args.dtype)
    M = 197 * args.batch
    rows = []
    for name, (in_f, out_f, act) in {"fc1": (768, 3072, "gelu"), "fc2": (3072, 768, None)}.items():
        x = torch.randn(M, in_f, device="cuda", dtype=dtype)
        bias = torch.randn(out_f, device="cuda", dtype=dtype)
        for block in [tuple(map(int, b.split("x"))) for b in args.blocks]:
            for sp in args.sparsity:
                w = block_masked_weight(out_f, in_f, block, sp, dtype)
                gact = (lambda y: F.gelu(y)) if act else (lambda y: y)
                row = {"layer": name, "M": M, "N": out_f, "K": in_f, "block": f"{block[0]}x{block[1]}",
                       "sparsity": sp, "dtype": args.dtype}
                row["dense_ms"] = median_ms(lambda: gact(F.linear(x, w, bias)), args.warmup, args.reps)
                try:
                    wb = w.to_sparse_bsr(block)
                    row["torch_bsr_ms"] = median_ms(lambda: gact(F.linear(x, wb, bias)), args.warmup, args.reps)
                except Exception as exc:  # noqa: BLE001 - torch BSR lacks some dtype/shape combos
                    row["torch_bsr_ms"] = None
                    row["torch_bsr_error"] = f"{type(exc).__name__}: {exc}"[:200]
                ws = BlockSparseWeight.from_dense(w, block=block)
                inp = KernelInput("cuda", dtype, f"bsr:{block[0]}x{block[1]}", act, x.device.index)
                for backend in ("triton_bsr", "cuda_bsr"):
                    reasons = get_kernel(backend).not_supported_reasons(inp)
                    if reasons:
                        row[f"{backend}_ms"], row[f"{backend}_why_not"] = None, "; ".join(reasons)
                        continue
                    fn = lambda: bsr_linear(x, ws, bias, act, kernel=backend)  # noqa: E731
                    ref = gact(F.linear(x.float(), w.float(), bias.float()))
                    row[f"{backend}_max_abs_err"] = (fn().float() - ref).abs().max().item()
                    row[f"{backend}_ms"] = median_ms(fn, args.warmup, args.reps)
                    row[f"{backend}_speedup_vs_dense"] = row["dense_ms"] / row[f"{backend}_ms"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def bench_attention(args):
    from sparsevit.kernels import attention_triton

    dtype = getattr(torch, args.dtype)
    rows = []
    # (name, B, H, N, Dqk, Dv): ViT-B full and pruned heads / head dims, Swin-T window attention
    for name, B, H, N, dqk, dv in [("vit_b", args.batch, 12, 197, 64, 64), ("vit_b_pruned", args.batch, 8, 197, 40, 48),
                                   ("swin_t_window", args.batch * 64, 3, 49, 32, 32),
                                   ("swin_t_pruned", args.batch * 64, 2, 49, 24, 32)]:
        q = torch.randn(B, H, N, dqk, device="cuda", dtype=dtype)
        k = torch.randn(B, H, N, dqk, device="cuda", dtype=dtype)
        v = torch.randn(B, H, N, dv, device="cuda", dtype=dtype)
        bias = torch.randn(1, H, N, N, device="cuda", dtype=dtype)
        row = {"case": name, "B": B, "H": H, "N": N, "Dqk": dqk, "Dv": dv, "dtype": args.dtype}
        row["sdpa_ms"] = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.125),
                                   args.warmup, args.reps)
        row["triton_ms"] = median_ms(lambda: attention_triton(q, k, v, bias, 0.125), args.warmup, args.reps)
        row["triton_speedup_vs_sdpa"] = row["sdpa_ms"] / row["triton_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _fmt(v):
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def to_markdown(result) -> str:
    lines = [f"# GPU kernels on {result['device']} (torch {result['torch']}, batch {result['batch']}, "
             f"{result['dtype']}, median of {result['reps']})", "",
             "| layer | block | sparsity | dense ms | torch BSR ms | triton ms | cuda C++ ms | best speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["linear"]:
        best = max([r.get("triton_speedup_vs_dense") or 0, r.get("cuda_cpp_speedup_vs_dense") or 0])
        lines.append(f"| {r['layer']} | {r['block']} | {r['sparsity']:.0%} | {_fmt(r['dense_ms'])} | "
                     f"{_fmt(r['torch_bsr_ms'])} | {_fmt(r.get('triton_ms'))} | {_fmt(r.get('cuda_cpp_ms'))} | "
                     f"{best:.2f}x |")
    lines += ["", "| attention | B | H | N | Dqk/Dv | SDPA ms | Triton ms | speedup |", "|---|---|---|---|---|---|---|---|"]
    for r in result["attention"]:
        lines.append(f"| {r['case']} | {r['B']} | {r['H']} | {r['N']} | {r['Dqk']}/{r['Dv']} | {_fmt(r['sdpa_ms'])} | "
                     f"{_fmt(r['triton_ms'])} | {r['triton_speedup_vs_sdpa']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--blocks", nargs="+", default=["32x32", "64x64"])
    p.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.8, 0.9])
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--skip-attention", action="store_true")
    p.add_argument("--out", default="bench/out/gpu_kernels", help="path prefix for .json and .md")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu_kernels.py: no CUDA device; nothing measured.", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
              "batch": args.batch, "dtype": args.dtype, "reps": args.reps, "warmup": args.warmup,
              "linear": bench_linear(args), "attention": [] if args.skip_attention else bench_attention(args)}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    md = to_markdown(result)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
