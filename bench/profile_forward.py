"""Where the time of an accelerated model's forward goes: ``torch.profiler`` top ops by self CPU time.

Builds the model (random init), a plan from :data:`sparsevit.benchmark.PRESETS`, accelerates it,
and profiles ``--iters`` forwards after warm-up. Prints the top ops by self CPU time with their
share of the total (shares, not absolute ms, are what compare across runs on a shared machine),
the end-to-end median, and the kernels the report chose for the Linears and the attention.

    python bench/profile_forward.py                                  # deit_small, heads_mlp_50, batch 8, fp32
    python bench/profile_forward.py --dtype bfloat16 --scenario heads_mlp_50+block_sparse_70
    python bench/profile_forward.py --scenario none                  # the unpruned model through accelerate
    python bench/profile_forward.py --baseline-backend dense         # also F.linear + SDPA, timed interleaved
    python bench/profile_forward.py --plan heads_mlp50+blocks70      # a plan of bench/peers.py (its model init)
    python bench/profile_forward.py --compare-unfused                # fused residual add+norm on vs off, interleaved
    python bench/profile_forward.py --compare-module-path            # lean block path on vs off, interleaved
    python bench/profile_forward.py --compare-python-loop            # the block loop in C++ vs in Python
    python bench/profile_forward.py --attention-peak --threads 1     # attention alone vs the peak probe

``--baseline-backend dense`` builds the same plan with ``backend="dense"`` (every Linear on
``F.linear``, attention on SDPA: what ``accelerate`` did for structured plans before the dense
options and the fused CPU attention) and times both alternately in one process
(:func:`sparsevit.benchmark.time_models`), so the ratio holds on a shared machine.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import sys
import time

import torch

import sparsevit
from sparsevit.benchmark import PRESETS, time_models


def build(args, backend=None):
    import timm

    torch.manual_seed(0)
    if args.plan:  # the model and plan exactly as bench/peers.py builds them
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import peers

        dense = peers.build_model(args.model, None, {})
        plan = peers.PLANS[args.plan][0](dense)
    else:
        dense = timm.create_model(args.model, pretrained=False).eval()
        plan = None if args.scenario == "none" else PRESETS[args.scenario](dense)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    fast = sparsevit.accelerate(dense, plan, dtype=dtype, batch_hint=args.batch, backend=backend or args.backend)
    build_s = time.perf_counter() - t0
    x = torch.randn(args.batch, 3, *dense.patch_embed.img_size, dtype=dtype)
    return fast, x, build_s


@contextlib.contextmanager
def count_lean_forwards():
    """A list that gets one entry per lean block-path forward inside the ``with`` (the profiler adds no
    module hooks, so the profiled forwards take the path the timed ones take; this shows it)."""
    from sparsevit.runtime import modules

    calls, real = [], modules._lean_forward

    def counted(*args):
        calls.append(1)
        return real(*args)

    modules._lean_forward = counted
    try:
        yield calls
    finally:
        modules._lean_forward = real


def profile(fast, x, iters: int, top: int):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch.inference_mode():
        for _ in range(2):
            fast(x)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fast(x)
            times.append((time.perf_counter() - t0) * 1e3)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof, count_lean_forwards() as lean:
            for _ in range(iters):
                fast(x)
    print(f"lean block path (runtime/modules.py _lean_forward) ran in {len(lean)} of {iters} profiled forwards")
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    table = [(e.key, e.count // iters, e.self_cpu_time_total / iters / 1e3, e.self_cpu_time_total / total)
             for e in rows]
    return statistics.median(times), table


def kernels_used(fast):
    counts = collections.Counter()
    for d in fast.sparsevit_report:
        if d.name.endswith((".qkv", ".proj", ".fc1", ".fc2", ".attn")):
            counts[f"{d.name.rsplit('.', 1)[1]}: {d.kernel} ({d.fmt})"] += 1
    return dict(sorted(counts.items()))


@contextlib.contextmanager
def _lean_path_without(name: str):
    """``runtime.modules.<name>`` made to answer None for the duration."""
    from sparsevit.runtime import modules

    real = getattr(modules, name)
    setattr(modules, name, lambda *args: None)
    try:
        yield
    finally:
        setattr(modules, name, real)


def module_path_only():
    """The blocks on the module path: the lean block path (runtime/modules.py) turned off, as for a
    model with hooks."""
    return _lean_path_without("_lean_parts")


def python_loop_only():
    """The lean block path with its loop in Python: the C++ loop (runtime/block_program.py) turned off."""
    return _lean_path_without("block_program")


def compare_interleaved(fast, x, runs: int, settings):
    """Median ms of the same model under two settings (name -> context-manager factory; the first is
    the reference), alternating calls; prints and returns medians, minimums and the pair ratio."""
    (ref, _), (other, _) = settings.items()
    times = {name: [] for name in settings}
    with torch.inference_mode():
        for i in range(runs + 2):
            for name, setting in settings.items():
                with setting():
                    t0 = time.perf_counter()
                    fast(x)
                    if i >= 2:
                        times[name].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    pairs = statistics.median(o / r for o, r in zip(times[other], times[ref]))
    print(f"\ninterleaved ({runs} runs each): {ref} median {med[ref]:.1f} ms (min {best[ref]:.1f}), {other} "
          f"{med[other]:.1f} ms (min {best[other]:.1f}); {other} / {ref}: medians {med[other] / med[ref]:.3f}x, mins "
          f"{best[other] / best[ref]:.3f}x, median of pair ratios {pairs:.3f}x; load average {os.getloadavg()[0]:.2f}")
    return {"median": med, "min": best, "pair_ratio": pairs}


def attention_shapes(fast, batch):
    """(B, H, N, Dqk, Dv) of every attention module of the accelerated model, with its count."""
    from sparsevit.runtime.modules import SparseAttention

    n = fast.patch_embed.num_patches + getattr(fast, "num_prefix_tokens", 1)
    shapes = collections.Counter()
    for m in fast.modules():
        if isinstance(m, SparseAttention):
            shapes[(batch, m.num_heads, n, m.qk_dim, m.v_dim)] += 1
    return shapes


def attention_peak(fast, batch, dtype, threads, runs=7):
    """The fused CPU attention on the model's shapes, alone: QK^T and PV FLOPs (2 B H N^2 (Dqk + Dv)) per
    second against the register-loop peak probe bench/kernels.py uses (``peak_gflops``), and SDPA on
    the same inputs, interleaved. CPU time per call (thread_time at 1 thread), so the shares hold on
    a shared machine; at more threads, wall time."""
    import torch.nn.functional as F

    clock = time.thread_time if threads == 1 else time.perf_counter
    peak = torch.ops.sparsevit_C.peak_gflops(str(dtype).split(".")[1], threads, 0.2)
    rows = []
    for (B, H, N, D, Dv), count in sorted(attention_shapes(fast, batch).items()):
        qkv = torch.randn(B, N, H * (2 * D + Dv)).to(dtype)
        q, k, v = qkv.split((H * D, H * D, H * Dv), -1)
        q, k, v = (t.view(B, N, H, -1).transpose(1, 2) for t in (q, k, v))
        calls = {"sparsevit": lambda: torch.ops.sparsevit_C.attention_cpu(q, k, v, None, D ** -0.5, -1),
                 "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=D ** -0.5)}
        reps = max(1, int(2e9 / (4 * B * H * N * N * D)))
        times = {name: [] for name in calls}
        with torch.inference_mode():
            for _ in range(runs):
                for name, call in calls.items():
                    t0 = clock()
                    for _ in range(reps):
                        call()
                    times[name].append((clock() - t0) / reps)
        med = {name: statistics.median(t) for name, t in times.items()}
        gflops = 2 * B * H * N * N * (D + Dv) / med["sparsevit"] / 1e9  # QK^T + PV
        rows.append({"shape": [B, H, N, D, Dv], "modules": count, "ms": 1e3 * med["sparsevit"],
                     "sdpa_ms": 1e3 * med["sdpa"], "gflops": gflops, "pct_peak": 100 * gflops / peak})
    print(f"\nattention alone ({threads} thread(s), {dtype}, peak probe {peak:.0f} GF/s):")
    print("| B, H, N, Dqk, Dv | modules | ms | GF/s | % of peak | SDPA ms |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['modules']} | {r['ms']:.3f} | {r['gflops']:.0f} | {r['pct_peak']:.0f}% | "
              f"{r['sdpa_ms']:.3f} |")
    return {"peak_gflops": peak, "shapes": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--scenario", default="heads_mlp_50", choices=["none", *PRESETS])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--baseline-backend", default="", help="also build with this backend; time both interleaved")
    p.add_argument("--plan", default="", help="a plan name of bench/peers.py (overrides --scenario)")
    p.add_argument("--compare-unfused", action="store_true",
                   help="also time the model with the fused residual add+norm off, interleaved")
    p.add_argument("--compare-module-path", action="store_true",
                   help="also time the model with the lean block path off (the module path), interleaved")
    p.add_argument("--compare-python-loop", action="store_true",
                   help="also time the model with the lean path's C++ block loop off (its Python loop), interleaved")
    p.add_argument("--attention-peak", action="store_true",
                   help="also time the fused attention alone on the model's shapes against the peak probe "
                        "(at 1 thread: CPU time)")
    p.add_argument("--json", default="", help="also write the result to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {args.backend: build(args)}
    if args.baseline_backend:
        models[args.baseline_backend] = build(args, args.baseline_backend)
    result = {"args": vars(args), "models": {}}
    for backend, (fast, x, build_s) in models.items():
        median, table = profile(fast, x, args.iters, args.top)
        print(f"\n# backend={backend}: {args.model} {args.plan or args.scenario} batch {args.batch} {args.dtype} {args.threads} "
              f"threads: median {median:.1f} ms/forward ({args.iters} runs), accelerate took {build_s:.1f} s, "
              f"load average {os.getloadavg()[0]:.2f}")
        print("| op | calls/forward | self CPU ms/forward | share |\n|---|---|---|---|")
        for key, calls, ms, share in table:
            print(f"| {key} | {calls} | {ms:.2f} | {100 * share:.1f}% |")
        print("kernels:", json.dumps(kernels_used(fast), indent=1))
        result["models"][backend] = {"median_ms": median, "build_s": build_s, "top": table,
                                     "kernels": kernels_used(fast)}
    if args.baseline_backend:
        x = models[args.backend][1]
        with torch.inference_mode():
            times = time_models({k: v[0] for k, v in models.items()}, x, warmup=2, runs=args.iters * 2)
        med = {k: 1e3 * statistics.median(t) for k, t in times.items()}
        print("\ninterleaved: " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items()) +
              f"; {args.baseline_backend} / {args.backend} = {med[args.baseline_backend] / med[args.backend]:.2f}x")
        result["interleaved_ms"] = med
    fast, x = models[args.backend][:2]
    if args.compare_unfused:
        from sparsevit.ops.residual import add_norm_fusion

        result["fusion_ms"] = compare_interleaved(fast, x, args.iters * 4, {
            "fused add+norm": lambda: add_norm_fusion(True), "unfused": lambda: add_norm_fusion(False)})
    if args.compare_module_path:
        result["lean_ms"] = compare_interleaved(fast, x, args.iters * 4, {
            "lean block path": contextlib.nullcontext, "module path": module_path_only})
    if args.compare_python_loop:
        result["loop_ms"] = compare_interleaved(fast, x, args.iters * 4, {
            "C++ block loop": contextlib.nullcontext, "Python block loop": python_loop_only})
    if args.attention_peak:
        result["attention_peak"] = attention_peak(models[args.backend][0], args.batch, getattr(torch, args.dtype),
                                                  args.threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
