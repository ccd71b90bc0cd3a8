"""End-to-end latency: dense timm vs sparsevit-accelerated, side by side in one run.

Each scenario builds the dense timm model (random init: latency does not depend on the values), a
plan, and the accelerated model; both are timed alternately (median of ``--runs`` runs after
``--warmup``), and the table reports ms, images/s, MAC reduction, speed-up and efficiency =
speed-up / MAC reduction (1.0 = the ideal speed-up the removed work allows). Result keys follow
timm's benchmark.py (``infer_samples_per_sec``, ``infer_step_time``, ``param_count``, ``gmacs``).

    python bench/latency.py                               # issue-2 scenarios on deit_small, batch 8
    python bench/latency.py --scenarios heads_mlp_50 --batch 1 --threads 2
    python bench/latency.py --quick                       # tiny model smoke run
    python bench/latency.py --scenarios p3b_50 p3b_75 --batch 1   # P3B plans (see p3b_plan)

``p3b_50`` / ``p3b_75``: P3B (a training-time method) needs data, so :func:`p3b_plan` runs its pruning
phase for a few steps on random images and labels to get a plan of that shape (per-block keep ratios,
residual read/write subsets, head-dim and hidden subsets, dropped branches). The weights and the
plan's choice of units are meaningless; only the latency of a P3B-shaped model is.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Callable, Dict, List

import torch

import sparsevit
from sparsevit.benchmark import PRESETS, plan_residual_io_no_gather, time_models


def p3b_plan(dense, sparsity: float, steps: int = 6, batch: int = 2, seed: int = 0):
    """A P3B plan for ``dense`` from ``steps`` pruning steps on random data (latency only, see above).

    The run is the pruning phase alone (``finetune_fraction=0``), 3 mask updates, the last one hard;
    the patch heads are 32 channels wide so the few steps stay cheap on a CPU."""
    from sparsevit.prune.p3b import p3b_prune

    g = torch.Generator().manual_seed(seed)
    size = dense.patch_embed.img_size
    data = [(torch.randn(batch, 3, *size, generator=g), torch.randint(0, dense.num_classes, (batch,), generator=g))
            for _ in range(steps)]
    res = p3b_prune(dense, sparsity, data, epochs=1, finetune_fraction=0.0, updates_per_epoch=3,
                    patch_head_width=32, progress=False, seed=seed)
    return res.plan


SCENARIOS: Dict[str, Callable] = dict(PRESETS, p3b_50=lambda m: p3b_plan(m, 0.5), p3b_75=lambda m: p3b_plan(m, 0.75))


def run(args) -> List[Dict]:
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    dense = timm.create_model(args.model, pretrained=False, **kwargs).eval()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    dense = dense.to(device=args.device, dtype=dtype)
    size = dense.patch_embed.img_size
    x = torch.randn(args.batch, 3, *size, device=args.device, dtype=dtype)
    results = []
    for name in args.scenarios:
        plan = SCENARIOS[name](dense)
        stats = plan.summary(dense, as_dict=True)["total"]
        fast = sparsevit.accelerate(dense, plan, backend=args.backend, batch_hint=args.batch)
        models = {"dense": dense, "sparsevit": fast}
        if name == "residual_io_50":
            # the same branch matmuls without any gather/scatter, timed in the same loop
            models["no_gather"] = sparsevit.accelerate(dense, plan_residual_io_no_gather(dense), backend=args.backend)
        times = time_models(models, x, args.warmup, args.runs)
        t_dense, t_fast = statistics.median(times["dense"]), statistics.median(times["sparsevit"])
        speedup = t_dense / t_fast
        results.append({
            "scenario": name, "model": args.model, "batch": args.batch, "threads": args.threads,
            "dtype": args.dtype, "device": args.device,
            "dense_ms": 1e3 * t_dense, "sparsevit_ms": 1e3 * t_fast,
            "infer_samples_per_sec": args.batch / t_fast, "dense_samples_per_sec": args.batch / t_dense,
            "infer_step_time": 1e3 * t_fast, "param_count": stats["params_after"] / 1e6,
            "gmacs": stats["macs_after"] / 1e9, "dense_gmacs": stats["macs_before"] / 1e9,
            "mac_reduction": stats["mac_ratio"], "speedup": speedup, "efficiency": speedup / stats["mac_ratio"],
            "gather_scatter_overhead": (t_fast / statistics.median(times["no_gather"]) - 1
                                        if "no_gather" in times else None),
            "kernels": sorted({d.kernel for d in fast.sparsevit_report if d.name.endswith(("qkv", "proj", "fc1", "fc2"))}),
        })
        print(format_row(results[-1]), flush=True)
    return results


HEADER = ("| scenario | dense ms | sparsevit ms | img/s | MAC reduction | speed-up | efficiency | "
          "gather+scatter overhead | kernels |\n|---|---|---|---|---|---|---|---|---|")


def format_row(r: Dict) -> str:
    ov = r.get("gather_scatter_overhead")
    ov = "" if ov is None else f"{100 * ov:+.1f}%"
    return (f"| {r['scenario']} | {r['dense_ms']:.1f} | {r['sparsevit_ms']:.1f} | {r['infer_samples_per_sec']:.1f} | "
            f"{r['mac_reduction']:.2f}x | {r['speedup']:.2f}x | {r['efficiency']:.2f} | {ov} | {', '.join(r['kernels'])} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--model-kwargs", default="", help="JSON kwargs for timm.create_model")
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="tiny model, few runs (smoke test)")
    p.add_argument("--out", default="", help="write JSON + Markdown to this prefix")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.model_kwargs = "vit_tiny_patch16_224", '{"img_size": 64, "depth": 2}'
        args.runs, args.warmup, args.batch = 3, 1, 2
    print(f"# latency: {args.model} batch {args.batch}, {args.threads} threads, {args.dtype}, {args.device}, "
          f"median of {args.runs} after {args.warmup} warm-up")
    print(HEADER)
    results = run(args)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(results, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(HEADER + "\n" + "\n".join(format_row(r) for r in results) + "\n")
    return results


if __name__ == "__main__":
    main()
