"""Where the time of an accelerated model's forward goes: ``torch.profiler`` top ops by self CPU time.

Builds the model (random init), a plan from :data:`sparsevit.benchmark.PRESETS`, accelerates it,
and profiles ``--iters`` forwards after warm-up. Prints the top ops by self CPU time with their
share of the total (shares, not absolute ms, are what compare across runs on a shared machine),
the end-to-end median, and the kernels the report chose for the Linears and the attention.

    python bench/profile_forward.py                                  # deit_small, heads_mlp_50, batch 8, fp32
    python bench/profile_forward.py --dtype bfloat16 --scenario heads_mlp_50+block_sparse_70
    python bench/profile_forward.py --scenario none                  # the unpruned model through accelerate
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

import torch

import sparsevit
from sparsevit.benchmark import PRESETS


def build(args):
    import timm

    torch.manual_seed(0)
    dense = timm.create_model(args.model, pretrained=False).eval()
    plan = None if args.scenario == "none" else PRESETS[args.scenario](dense)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    fast = sparsevit.accelerate(dense, plan, dtype=dtype, batch_hint=args.batch, backend=args.backend)
    build_s = time.perf_counter() - t0
    x = torch.randn(args.batch, 3, *dense.patch_embed.img_size, dtype=dtype)
    return fast, x, build_s


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
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                fast(x)
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
    p.add_argument("--json", default="", help="also write the result to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    fast, x, build_s = build(args)
    median, table = profile(fast, x, args.iters, args.top)
    print(f"# {args.model} {args.scenario} batch {args.batch} {args.dtype} {args.threads} threads: "
          f"median {median:.1f} ms/forward ({args.iters} runs), accelerate took {build_s:.1f} s")
    print("| op | calls/forward | self CPU ms/forward | share |\n|---|---|---|---|")
    for key, calls, ms, share in table:
        print(f"| {key} | {calls} | {ms:.2f} | {100 * share:.1f}% |")
    print("kernels:", json.dumps(kernels_used(fast), indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median_ms": median, "build_s": build_s, "top": table,
                       "kernels": kernels_used(fast)}, f, indent=1)


if __name__ == "__main__":
    main()
