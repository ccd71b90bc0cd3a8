"""Per-op CPU benchmark: dense torch vs torch.sparse (BSR, CSR) vs sparsevit's C++ BSR kernel.

Shapes are the Linear layers of ViT-B/16 and DeiT-S (MLP fc1/fc2, attention qkv/proj); tokens are
197 x batch; weights are random non-zero data under random block masks at the benchmarked block
shape (exactly round((1 - sparsity) * n_blocks) blocks kept). Every method of one configuration is
timed in interleaved rounds (so background load hits all of them alike; at ``--threads 1`` in the
thread's CPU time); reported is the median (or ``--stat min``) after warm-up, the speed-up vs dense torch in the same dtype, and sparsevit's kept work (2 x kept
block area x tokens) as % of the machine's peak: ``torch.ops.sparsevit_C.peak_gflops`` (16
independent register-only ``vfmadd231ps``/``vdpbf16ps`` zmm chains per thread, see
bench/cpu_kernels.py), the best of three probes per dtype at the benchmark's thread count (the clock
moves with the other core's load; a single probe taken at a slow moment put kernels above 100%).
sparsevit is also timed back to back (the same call repeated, caches warm, as kernel-level benchmarks
such as oneDNN's benchdnn time by default) next to the interleaved rounds, where the dense call in
between evicts its weights and activations (closer to a layer inside a model): both are reported.

    python bench/kernels.py --quick                 # ViT-B fc1/fc2, 197x8 tokens, the target grid
    python bench/kernels.py --threads 2 --out bench/out/kernels
    python bench/kernels.py --shapes vit_b.fc1 --tokens 197 1576 --blocks 32x32 --dtypes float32 bfloat16

sparsevit is timed as the accelerated model calls it (the op straight from ``SparseLinear``, see
:func:`sparsevit_call`). The BSR kernels alone (no op or Python overhead, no torch):
bench/bsr_microbench.cpp.

Writes ``<out>.json`` (one record per configuration and method, timm-style ``infer_step_time`` in
ms and ``infer_samples_per_sec`` in tokens/s) and ``<out>.md`` (one table per dtype/shape/tokens).

``--plan NAME`` instead measures every Linear of DeiT-S accelerated under a plan of bench/peers.py
(``heads_mlp50``, ``heads_mlp50+blocks70``, ...) on the inputs it sees in a forward at ``--batch``:
the module the chooser built and, for dense layers, every dense candidate, side by side in
interleaved rounds, with kept work in GF/s and % of the peak. Run it with ``--threads 1``: each
call is then timed in the thread's CPU time (``time.thread_time``), which a shared machine disturbs
less than a wall clock; the numbers stay indicative.

    python bench/kernels.py --threads 1 --plan heads_mlp50+blocks70 --batch 1 --dtypes bfloat16
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparsevit import _ext  # noqa: E402
from sparsevit.formats import BlockSparseWeight  # noqa: E402
from sparsevit.ops.bsr import bsr_linear  # noqa: E402
from sparsevit.ops.linear_kernels import get_kernel  # noqa: E402

SHAPES = {  # name: (in_features, out_features)
    "vit_b.fc1": (768, 3072), "vit_b.fc2": (3072, 768), "vit_b.qkv": (768, 2304), "vit_b.proj": (768, 768),
    "deit_s.fc1": (384, 1536), "deit_s.fc2": (1536, 384), "deit_s.qkv": (384, 1152), "deit_s.proj": (384, 384),
    # DeiT-S after 50% head / MLP slicing: 3 of 6 heads (qkv 576, proj in 192), MLP 768 (or ~770)
    "deit_s50.qkv": (384, 576), "deit_s50.qkv4": (384, 768), "deit_s50.proj2": (128, 384),
    "deit_s50.proj": (192, 384), "deit_s50.proj4": (256, 384), "deit_s50.fc1": (384, 770),
    "deit_s50.fc2": (770, 384),
}
METHODS = ("dense", "torch_bsr", "torch_csr", "sparsevit")


def block_mask(out_f, in_f, block, sparsity, gen):
    bh, bw = block
    nbr, nbc = -(-out_f // bh), -(-in_f // bw)
    n = nbr * nbc
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=gen)[: max(1, round((1 - sparsity) * n))]] = True
    return keep.reshape(nbr, nbc).repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:out_f, :in_f]


def make_methods(x, w, mask, block, wanted=METHODS):
    """name -> zero-arg callable (or the reason it cannot run)."""
    wm = w * mask
    out = {"dense": lambda: F.linear(x, wm)}
    for name, conv in (("torch_bsr", lambda: wm.to_sparse_bsr(block)), ("torch_csr", wm.to_sparse_csr)):
        if name not in wanted:
            out[name] = "not run"
            continue
        try:
            ws = conv()
            F.linear(x[:2], ws)  # probe: unsupported dtype/layout combos raise here
            out[name] = (lambda ws=ws: F.linear(x, ws))
        except Exception as exc:  # noqa: BLE001 - report any unsupported combination as n/a
            out[name] = f"n/a ({type(exc).__name__})"
    if _ext.has_op("bsr_linear") and x.dtype in (torch.float32, torch.bfloat16):
        out["sparsevit"] = sparsevit_call(x, BlockSparseWeight.from_dense(w, block=block, mask=mask))
    else:
        out["sparsevit"] = "n/a (no C++ kernel)"
    return out


def sparsevit_call(x, bs):
    """The op call an accelerated model makes for this weight: ``SparseLinear``'s direct C++ call
    (the path every SparseLinear and the lean block path take in eager inference), else the generic
    ``bsr_linear`` wrapper. The wrapper's own checks cost ~10-14 us a call, ~12% of a 384x384 layer
    at 197 tokens, which the model never pays."""
    from sparsevit.runtime.linear import SparseLinear

    lin = SparseLinear(bs, None)
    direct = lin.direct_args()
    if direct and x.dim() == 2:
        return lambda: lin.run_direct(x, direct)
    return lambda: bsr_linear(x, bs)


def call_clock():
    """The thread's CPU time at one thread (a shared machine disturbs it less), else the wall clock."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def time_interleaved(fns, warmup, reps, max_s, stat="median"):
    """Median (or min) ms per callable; methods alternate within each round, so background load
    hits all of them alike. Slow configurations stop after 3 rounds once ``max_s`` is spent. At one
    thread each call is timed in the thread's CPU time (``time.thread_time``), which time spent
    waiting for a core another process holds does not count (the wall clock varied 1.2-2.3x over
    minutes on the shared 2-core host); at more threads in the wall clock."""
    clock = call_clock()
    times = {k: [] for k in fns}
    for k, f in fns.items():
        for _ in range(warmup):
            f()
    t_start = time.perf_counter()
    for r in range(reps):
        for k, f in fns.items():
            t0 = clock()
            f()
            times[k].append((clock() - t0) * 1e3)
        if r >= 2 and time.perf_counter() - t_start > max_s:
            break
    agg = min if stat == "min" else statistics.median
    return {k: agg(v) for k, v in times.items()}


def time_back_to_back(fn, warmup, reps, stat="median"):
    """ms of ``fn`` called ``reps`` times in a row (same clock as :func:`time_interleaved`): its
    weights and activations stay in cache between calls, as in a kernel-level benchmark (oneDNN's
    benchdnn times this way by default). In the interleaved rounds the dense call in between evicts
    them, which is closer to a layer inside a model."""
    clock = call_clock()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = clock()
        fn()
        times.append((clock() - t0) * 1e3)
    return (min if stat == "min" else statistics.median)(times)


def measure_peaks(threads):
    """dtype name -> register-loop peak GF/s at `threads` threads (None without the extension)."""
    if not _ext.has_op("peak_gflops"):
        return {}
    return {d: max(torch.ops.sparsevit_C.peak_gflops(d, threads, 0.1) for _ in range(3))
            for d in ("float32", "bfloat16")}


def run(args, peaks):
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    records = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for shape_name in args.shapes:
            in_f, out_f = SHAPES[shape_name]
            w = (torch.randn(out_f, in_f, generator=gen) * 0.02 + 0.01).to(dtype)
            for tokens in args.tokens:
                x = torch.randn(tokens, in_f, generator=gen).to(dtype)
                for block in args.blocks:
                    for sp in args.sparsity:
                        mask = block_mask(out_f, in_f, block, sp, gen)
                        methods = make_methods(x, w, mask, block, args.methods)
                        runnable = {k: v for k, v in methods.items() if callable(v)
                                    and (k == "dense" or k in args.methods)}
                        ms = time_interleaved(runnable, args.warmup, args.reps, args.max_seconds, args.stat)
                        dense_ms = ms["dense"]
                        density = float(mask.float().mean())
                        flops = 2.0 * tokens * in_f * out_f
                        for m in METHODS:
                            rec = dict(dtype=dtype_name, shape=shape_name, in_features=in_f, out_features=out_f,
                                       tokens=tokens, block=f"{block[0]}x{block[1]}", sparsity=sp,
                                       density=round(density, 4), method=m, threads=args.threads)
                            if m in ms:
                                rec.update(infer_step_time=round(ms[m], 4),
                                           infer_samples_per_sec=round(tokens / ms[m] * 1e3, 1),
                                           speedup=round(dense_ms / ms[m], 3),
                                           effective_gflops=round(flops / ms[m] / 1e6, 1))
                                if m == "sparsevit" and peaks.get(dtype_name):
                                    kept = flops * density
                                    rec["kept_pct_peak"] = round(100 * kept / ms[m] / 1e6 / peaks[dtype_name], 1)
                                    hot = time_back_to_back(runnable[m], args.warmup, args.reps, args.stat)
                                    rec["back_to_back_ms"] = round(hot, 4)
                                    rec["kept_pct_peak_back_to_back"] = round(100 * kept / hot / 1e6 / peaks[dtype_name], 1)
                            else:
                                rec.update(infer_step_time=None,
                                           note=methods[m] if isinstance(methods[m], str) else "not run")
                            records.append(rec)
                        r = {rr["method"]: rr for rr in records[-len(METHODS):]}
                        print(f"{dtype_name:8s} {shape_name:10s} T={tokens:5d} {block[0]}x{block[1]:<3d} "
                              f"sp={sp:.2f} " + "  ".join(
                                  f"{m}={r[m]['infer_step_time']}ms({r[m].get('speedup', '-')}x)" for m in METHODS)
                              + f" kept%peak={r['sparsevit'].get('kept_pct_peak', '-')}"
                              + f" back-to-back={r['sparsevit'].get('kept_pct_peak_back_to_back', '-')}", flush=True)
    return records


def layer_inputs(fast, x):
    """name -> (module, its input in one forward of ``fast``) for every accelerated Linear."""
    from sparsevit.runtime.dense_linear import DenseLinear
    from sparsevit.runtime.linear import SparseLinear

    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.setdefault(n, (mod, inp[0].clone())) and None)
             for n, m in fast.named_modules() if isinstance(m, (SparseLinear, DenseLinear))]
    try:
        with torch.inference_mode():
            fast(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def kept_macs(module):
    """Multiply-adds per token of what the module computes: kept blocks (padded to whole blocks) of a
    block-sparse weight, stored weights of other sparse formats, the full weight of a dense one."""
    w = module.weight
    if hasattr(w, "crow_indices") and hasattr(w, "block"):
        return int(w.col_indices.numel()) * w.block[0] * w.block[1]
    if hasattr(w, "nnz"):
        return int(w.nnz)
    return module.in_features * module.out_features


def run_plan_layers(args, peaks):
    """Per-Linear timings of DeiT-S under ``args.plan`` (see the module docstring)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import peers

    import sparsevit
    from sparsevit.ops.dense_cpu import dense_candidates
    from sparsevit.runtime.dense_linear import DenseLinear

    clock = call_clock()
    records = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        model = peers.build_model("deit_small_patch16_224", None, {})
        fast = sparsevit.accelerate(model, peers.PLANS[args.plan][0](model), dtype=dtype, batch_hint=args.batch)
        peak = peaks.get(dtype_name) or float("nan")
        print(f"\n{args.plan}, batch {args.batch}, {dtype_name}, peak {peak:.0f} GF/s; ms median "
              f"({'thread CPU time' if args.threads == 1 else 'wall'}), kept GF/s, % of peak")
        for name, (mod, x) in layer_inputs(fast, torch.randn(args.batch, 3, 224, 224, dtype=dtype)).items():
            fns = {"chosen": lambda m=mod, x=x: m(x)}
            if isinstance(mod, DenseLinear):
                for c in dense_candidates(mod.weight, mod.bias, mod.activation, dtype=dtype):
                    if not c.not_supported_reasons:
                        fns[c.name] = lambda m=c.build(), x=x: m(x)
            with torch.inference_mode():
                for f in fns.values():
                    f()
                times = {k: [] for k in fns}
                for _ in range(args.reps):
                    for k, f in fns.items():
                        t0 = clock()
                        f()
                        times[k].append(clock() - t0)
            flops = 2.0 * kept_macs(mod) * (x.numel() // x.shape[-1])
            rec = dict(plan=args.plan, batch=args.batch, dtype=dtype_name, layer=name, in_features=mod.in_features,
                       out_features=mod.out_features, kernel=getattr(mod, "kernel", "?"), kept_gflop=flops / 1e9)
            cells = []
            for k, v in times.items():
                ms = 1e3 * statistics.median(v)
                rec[k] = dict(ms=round(ms, 4), gflops=round(flops / ms / 1e6, 1),
                              pct_peak=round(100 * flops / ms / 1e6 / peak, 1))
                cells.append(f"{k} {ms:.3f} ms {rec[k]['gflops']:.0f} GF/s {rec[k]['pct_peak']:.0f}%")
            records.append(rec)
            print(f"{name:20s} {mod.in_features:4d}->{mod.out_features:<4d} {rec['kernel']:18s} " + " | ".join(cells),
                  flush=True)
    return records


def fmt(rec):
    if rec.get("infer_step_time") is None:
        return "not run" if rec.get("note") == "not run" else "n/a"
    return f"{rec['infer_step_time']:.2f} ({rec['speedup']:.2f}x)"


def to_markdown(records, meta):
    lines = [f"CPU: {meta['cpu']}; torch {meta['torch']}; threads {meta['threads']}; kernel "
             f"`{meta['kernel']}`; {meta['stat']} of interleaved runs (sparsevit also back to back); ms (speed-up vs dense torch, same dtype); "
             f"load average at start {meta['loadavg']}; peak GF/s {meta['peaks']}.", ""]
    groups = {}
    for r in records:
        groups.setdefault((r["dtype"], r["shape"], r["tokens"]), {}).setdefault(
            (r["block"], r["sparsity"]), {})[r["method"]] = r
    for (dt, shape, tokens), rows in groups.items():
        lines.append(f"**{shape}** ({rows[next(iter(rows))]['dense']['in_features']}->"
                     f"{rows[next(iter(rows))]['dense']['out_features']}), {dt}, {tokens} tokens")
        lines.append("")
        lines.append("| block | sparsity | dense ms | torch BSR | torch CSR | sparsevit | kept % of peak "
                     "| sparsevit back-to-back ms | kept % of peak back-to-back |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for (block, sp), ms in rows.items():
            lines.append(f"| {block} | {sp:.0%} | {ms['dense']['infer_step_time']:.2f} | {fmt(ms['torch_bsr'])} | "
                         f"{fmt(ms['torch_csr'])} | {fmt(ms['sparsevit'])} | {ms['sparsevit'].get('kept_pct_peak', '-')} | "
                         f"{ms['sparsevit'].get('back_to_back_ms', '-')} | "
                         f"{ms['sparsevit'].get('kept_pct_peak_back_to_back', '-')} |")
        lines.append("")
    return "\n".join(lines)


def parse_block(s):
    a, b = s.lower().split("x")
    return int(a), int(b)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="small grid: ViT-B fc1/fc2, 197x8 tokens")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[197, 197 * 8, 197 * 32])
    p.add_argument("--sparsity", nargs="+", type=float, default=[0.3, 0.5, 0.7, 0.8, 0.9, 0.95])
    p.add_argument("--blocks", nargs="+", type=parse_block, default=[(1, 8), (16, 16), (32, 32), (64, 64)])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--max-seconds", type=float, default=6.0, help="per configuration, after 3 rounds")
    p.add_argument("--methods", nargs="+", default=list(METHODS[1:]), choices=list(METHODS[1:]),
                   help="methods besides dense (always timed)")
    p.add_argument("--stat", choices=["median", "min"], default="median")
    p.add_argument("--out", default="bench/out/kernels")
    p.add_argument("--plan", default=None, help="per-Linear mode: a plan name of bench/peers.py PLANS")
    p.add_argument("--batch", type=int, default=8, help="images per forward in --plan mode")
    args = p.parse_args(argv)
    if args.quick:  # the target grid, in a few minutes
        args.shapes = ["vit_b.fc1", "vit_b.fc2"]
        args.tokens = [197 * 8]
        args.sparsity = [0.25, 0.5, 0.7, 0.9]
        args.blocks = [(16, 16), (32, 32)]
        args.dtypes = ["float32"]
        args.reps = min(args.reps, 5)
    meta = dict(cpu=platform.processor() or platform.machine(), torch=torch.__version__, threads=args.threads,
                kernel=get_kernel("cpp_bsr").label(), stat=args.stat, loadavg=tuple(round(v, 2) for v in os.getloadavg()))
    try:
        with open("/proc/cpuinfo") as f:
            meta["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    torch.set_num_threads(args.threads)
    meta["peaks"] = {k: round(v) for k, v in measure_peaks(args.threads).items()}
    if args.plan:
        records = run_plan_layers(args, meta["peaks"])
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(f"{args.out}.{args.plan}.b{args.batch}.json", "w") as f:
            json.dump({"meta": meta, "args": vars(args), "results": records}, f, indent=1)
        return
    records = run(args, meta["peaks"])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "args": {k: v for k, v in vars(args).items()}, "results": records}, f, indent=1)
    md = to_markdown(records, meta)
    with open(args.out + ".md", "w") as f:
        f.write(md + "\n")
    print()
    print(md)


if __name__ == "__main__":
    main()
