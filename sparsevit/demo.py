"""End-to-end demo on real data, CPU, a few minutes: ``python -m sparsevit.demo``.

1. Train a small ViT (timm's ``vit_tiny_patch16_224`` constructor at 32 px, patch 8, width 96,
   depth 6, 6 heads) on scikit-learn's bundled handwritten digits (real images, no download).
2. Prune 50% of its prunable parameters with grouped structural global pruning (Taylor), fine-tune
   under the plan, compare accuracy.
3. ``sparsevit.accelerate`` it; check the fast model's outputs against the masked dense model.
4. Time dense vs accelerated side by side, here and on a full-size DeiT-S (224 px, batch 8) with the
   structured plan, 70% 32x32 block sparsity, and both combined.
5. Save and load the fast model and check the round trip.
6. A short summary table: accuracy, parameters, MACs, latency dense vs fast, output difference.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

import sparsevit


def accuracy(model, loader) -> float:
    from sparsevit.prune.finetune import evaluate

    return 100.0 * evaluate(model, loader)


def latency_rows(dense, variants, x, runs):
    """Print (and return as ``[(label, ms, mac_ratio, kernels)]``) dense vs accelerated latency."""
    from sparsevit.benchmark import median_ms, time_models

    models, info = {"dense timm": dense}, {"dense timm": (1.0, "torch")}
    for label, plan in variants:
        fast = sparsevit.accelerate(dense, plan, batch_hint=x.shape[0])
        kernels = sorted({d.kernel for d in fast.sparsevit_report if d.name.endswith(("qkv", "proj", "fc1", "fc2"))})
        models[label] = fast
        info[label] = (plan.summary(dense, as_dict=True)["total"]["mac_ratio"], ", ".join(kernels))
    times = time_models(models, x, warmup=2, runs=runs)
    rows = [(label, median_ms(times[label]), *info[label]) for label in models]
    base = rows[0][1]
    print(f"  {'model':<34} {'ms':>9} {'speed-up':>9} {'MAC cut':>8}  kernels")
    for label, ms, macs, kernels in rows:
        print(f"  {label:<34} {ms:>9.1f} {base / ms:>8.2f}x {macs:>7.2f}x  {kernels}")
    return rows


def summary_table(acc, params, macs, latency_ms, batch: int, threads: int, err: float) -> str:
    """The closing table: one row per quantity, dense vs pruned + accelerated."""
    rows = [("top-1 on held-out digits", f"{acc[0]:.2f}%", f"{acc[1]:.2f}%", f"{acc[1] - acc[0]:+.2f} pts"),
            ("parameters", f"{params[0] / 1e6:.3f} M", f"{params[1] / 1e6:.3f} M", f"{params[1] / params[0]:.2f}x"),
            ("MACs per image", f"{macs[0] / 1e6:.2f} M", f"{macs[1] / 1e6:.2f} M", f"{macs[1] / macs[0]:.2f}x"),
            (f"latency (batch {batch}, {threads} threads)", f"{latency_ms[0]:.2f} ms", f"{latency_ms[1]:.2f} ms",
             f"{latency_ms[0] / latency_ms[1]:.2f}x faster"),
            ("output vs masked dense model", "", f"{err:.1e}", "max relative difference")]
    head = ("", "dense", "pruned + fast", "")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    return "\n".join("  " + ln for ln in lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30, help="training epochs on digits")
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=10, help="timed runs per model (median reported)")
    p.add_argument("--skip-deit", action="store_true", help="skip the full-size DeiT-S latency table")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import timm

    from sparsevit.data import digits_loaders

    print("== 1. data and model")
    train, val = digits_loaders(classes=range(10), img_size=32, batch_size=32, seed=0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=96,
                              depth=6, num_heads=6, num_classes=10)
    print(f"  ViT (32 px, patch 8, dim 96, depth 6): {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params;"
          f" digits: {len(train.dataset)} train / {len(val.dataset)} held-out images")
    model = sparsevit.finetune(model, None, train, epochs=args.epochs, lr=1e-3, warmup=0.1)
    acc_dense = accuracy(model, val)
    print(f"  dense top-1 on held-out digits: {acc_dense:.2f}%")

    print(f"== 2. prune {100 * args.sparsity:.0f}% (grouped, taylor) and fine-tune")
    plan = sparsevit.prune(model, method="grouped", criterion="taylor", sparsity=args.sparsity, data=train,
                           num_batches=8)
    print(plan.summary(model))
    tuned = sparsevit.finetune(model, plan, train, epochs=args.finetune_epochs, lr=5e-4, warmup=0.1)
    acc_pruned = accuracy(tuned, val)
    print(f"  pruned top-1: {acc_pruned:.2f}% (dense {acc_dense:.2f}%)")

    print("== 3. accelerate and check")
    fast = sparsevit.accelerate(tuned)  # plan read back from the zeros of the fine-tuned masked model
    x = next(iter(val))[0]
    with torch.inference_mode():
        ref, out = tuned(x), fast(x)
    err = float((out - ref).abs().max() / ref.abs().max())
    print(f"  max relative difference vs masked dense model: {err:.2e}")
    if err > 1e-4:
        print("  MISMATCH: accelerated model disagrees with the masked model", file=sys.stderr)
        return 1
    acc_fast = accuracy(fast, val)
    print(f"  accelerated top-1: {acc_fast:.2f}%  | params {sum(p.numel() for p in tuned.parameters()) / 1e6:.2f} M"
          f" -> {sum(p.numel() for p in fast.parameters()) / 1e6:.2f} M")

    print("== 4. latency (median of runs, side by side)")
    print(f"  the digits ViT, batch {x.shape[0]}:")
    digits_rows = latency_rows(tuned, [("pruned + accelerated", plan)], x, args.runs)
    if not args.skip_deit:
        from sparsevit.benchmark import plan_block_sparse, plan_heads_mlp, plan_structured_then_block_sparse

        deit = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
        xd = torch.randn(8, 3, 224, 224)
        print("  deit_small_patch16_224, 224 px, batch 8 (random weights: latency does not depend on them):")
        latency_rows(deit, [("50% heads + 50% MLP channels", plan_heads_mlp(deit)),
                            ("70% 32x32 block sparsity", plan_block_sparse(deit)),
                            ("both", plan_structured_then_block_sparse(deit))], xd, max(3, args.runs // 2))

    print("== 5. save / load")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "vit_digits.sparsevit")
        sparsevit.save(fast, path)
        back = sparsevit.load(path)
        with torch.inference_mode():
            same = torch.equal(back(x), out)
        print(f"  {os.path.getsize(path) / 1e6:.2f} MB written; reloaded model identical: {same}")
    print("\nper-layer report (first rows):")
    print("\n".join(fast.sparsevit_report.table().splitlines()[:8]))
    total = plan.summary(model, as_dict=True)["total"]
    print("\n== summary (the digits ViT)")
    print(summary_table((acc_dense, acc_fast), (total["params_before"], sum(p.numel() for p in fast.parameters())),
                        (total["macs_before"], total["macs_after"]), (digits_rows[0][1], digits_rows[1][1]),
                        x.shape[0], args.threads, err))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
