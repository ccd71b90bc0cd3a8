"""Accuracy benchmark on real data (scikit-learn digits, no downloads): prune, fine-tune, measure.

Transfer task in the style of the papers: a small timm ViT (built with timm's own constructor) is
pre-trained on digits 0-4, gets a new head and is fine-tuned on digits 5-9 (the dense reference);
it is then pruned to 50% / 75% of its prunable parameters with every criterion, fine-tuned for the
same fixed budget, and evaluated on the held-out split of 5-9 through ``sparsevit.accelerate``.
Torch-Pruning (optional: ``pip install torch-pruning``) runs on the same task, matched to the same
parameter count, with the same fine-tuning budget, as the outside reference.

    python bench/accuracy.py                 # full run (CPU, a few minutes), prints a Markdown table
    python bench/accuracy.py --quick         # smoke run
    python bench/accuracy.py --write-results # also writes the table into bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import re
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*compiled kernels unavailable.*")

import sparsevit  # noqa: E402
import sparsevit.prune  # noqa: E402,F401  (binds sparsevit.prune / sparsevit.finetune)
from sparsevit.data import digits_loaders  # noqa: E402
from sparsevit.prune import criteria as C  # noqa: E402
from sparsevit.prune.finetune import evaluate, finetune  # noqa: E402

SECTION = "## Accuracy (digits transfer)"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def build_model(args, num_classes: int):
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=args.img_size,
                             patch_size=args.patch_size, embed_dim=args.dim, depth=args.depth,
                             num_heads=args.heads, mlp_ratio=4.0, num_classes=num_classes,
                             drop_path_rate=0.0)


def loaders(args, classes):
    return digits_loaders(classes=classes, img_size=args.img_size, batch_size=args.batch_size,
                          val_fraction=0.25, seed=args.seed)


def train(model, plan, args, classes, epochs, lr):
    torch.manual_seed(args.seed)
    tr, _ = loaders(args, classes)
    return finetune(model, plan, tr, epochs=epochs, lr=lr, weight_decay=0.05, warmup=0.1,
                    progress=not args.no_progress)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def torch_pruning_run(dense, args, calib, target_params: int, criterion: str):
    """Torch-Pruning MetaPruner (uniform channel ratio, head dims pruned, classifier ignored), the ratio
    bisected so the pruned model has ``target_params`` parameters; returns (model, ratio)."""
    import timm
    import torch_pruning as tp

    def pruned(ratio):
        model = copy.deepcopy(dense).eval()
        Attn = timm.layers.attention.Attention
        num_heads = {m.qkv: m.num_heads for m in model.modules() if isinstance(m, Attn)}
        imp = tp.importance.GroupTaylorImportance() if criterion == "taylor" else \
            tp.importance.GroupMagnitudeImportance(p=2)
        pruner = tp.pruner.MetaPruner(model, torch.randn(1, 3, args.img_size, args.img_size), importance=imp,
                                      pruning_ratio=ratio, ignored_layers=[model.head], num_heads=num_heads,
                                      prune_num_heads=False, prune_head_dims=True, global_pruning=False,
                                      round_to=1)
        if criterion == "taylor":
            model.zero_grad()
            for x, y in calib:
                torch.nn.functional.cross_entropy(model(x), y).backward()
        pruner.step()
        for m in model.modules():
            if isinstance(m, Attn):
                m.num_heads = pruner.num_heads[m.qkv]
                m.head_dim = m.qkv.out_features // (3 * m.num_heads)
                m.attn_dim = m.num_heads * m.head_dim
        model.zero_grad(set_to_none=True)
        return model

    lo, hi = 0.0, 0.95
    for _ in range(12):
        mid = (lo + hi) / 2
        if n_params(pruned(mid)) > target_params:
            lo = mid
        else:
            hi = mid
    return pruned(hi), hi


def macs_of(model, img_size) -> int:
    """MACs per image of any model (Linear/conv + attention matmuls), by forward hooks."""
    macs = [0]

    def lin(m, i, o):
        macs[0] += o.numel() // o.shape[0] * m.in_features

    def conv(m, i, o):
        k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
        macs[0] += o.numel() // o.shape[0] * k

    def attn(m, i, o):
        x = i[0]
        n = x.shape[1]
        macs[0] += 2 * n * n * m.num_heads * m.head_dim

    import timm

    hooks = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(lin))
        elif isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, timm.layers.attention.Attention):
            hooks.append(m.register_forward_hook(attn))
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, img_size, img_size))
    for h in hooks:
        h.remove()
    return macs[0]


def run(args):
    t0 = time.time()
    src, tgt = list(range(0, 5)), list(range(5, 10))
    torch.manual_seed(args.seed)
    model = build_model(args, num_classes=len(src))
    pre = train(model, None, args, src, args.pretrain_epochs, args.lr)
    src_acc = evaluate(pre, loaders(args, src)[1])
    pre.reset_classifier(len(tgt))
    dense = train(pre, None, args, tgt, args.transfer_epochs, args.lr / 2)
    _, tgt_val = loaders(args, tgt)
    dense_acc = evaluate(dense, tgt_val)
    dense_params = n_params(dense)
    dense_macs = sparsevit.get_adapter(dense).count(sparsevit.SparsityPlan.dense(dense))["total"]["macs_before"]
    print(f"# pretrain 0-4 val top-1 {100 * src_acc:.2f}; transfer 5-9 dense top-1 {100 * dense_acc:.2f} "
          f"({time.time() - t0:.0f}s)", file=sys.stderr)
    calib = list(itertools.islice(loaders(args, tgt)[0], args.num_batches))
    rows = [dict(method="dense (transfer)", criterion="-", sparsity=0.0, params=dense_params, macs=dense_macs,
                 oneshot=dense_acc, acc=dense_acc)]
    # the dense model given the same extra fine-tuning budget: the fair reference for "retained"
    more = train(dense, None, args, tgt, args.finetune_epochs, args.ft_lr)
    rows.append(dict(method="dense + same fine-tune budget", criterion="-", sparsity=0.0, params=dense_params,
                     macs=dense_macs, oneshot=dense_acc, acc=evaluate(more, tgt_val)))
    scores = {c: C.unit_scores(dense, c, calib, num_batches=None, progress=False) for c in args.criteria}
    for sp in args.sparsities:
        for crit in args.criteria:
            plan = sparsevit.prune(dense, method="grouped", criterion=crit, sparsity=sp, data=calib,
                                   scores=scores[crit], progress=False)
            one = evaluate(sparsevit.masked_model(dense, plan), tgt_val)
            ft = train(dense, plan, args, tgt, args.finetune_epochs, args.ft_lr)
            fast = sparsevit.accelerate(ft)
            acc = evaluate(fast, tgt_val)
            st = plan.meta["stats"]["total"]
            assert abs(n_params(fast) - st["params_after"]) <= 0.005 * st["params_after"] + 1, "count mismatch"
            rows.append(dict(method="sparsevit grouped", criterion=crit, sparsity=st["prunable_removed"],
                             params=st["params_after"], macs=st["macs_after"], oneshot=one, acc=acc))
            print(f"# grouped {crit} {sp}: one-shot {100 * one:.2f} -> {100 * acc:.2f} ({time.time() - t0:.0f}s)",
                  file=sys.stderr)
        if args.unstructured:
            plan = sparsevit.prune(dense, method="magnitude_unstructured", criterion="lamp", sparsity=sp)
            one = evaluate(sparsevit.masked_model(dense, plan), tgt_val)
            ft = train(dense, plan, args, tgt, args.finetune_epochs, args.ft_lr)
            acc = evaluate(sparsevit.accelerate(ft, plan), tgt_val)
            st = plan.meta["stats"]["total"]
            rows.append(dict(method="sparsevit unstructured (masks)", criterion="lamp",
                             sparsity=st["prunable_removed"], params=st["params_after"], macs=st["macs_after"],
                             oneshot=one, acc=acc))
        if args.torch_pruning:
            try:
                import torch_pruning  # noqa: F401
            except ImportError:
                print("# torch-pruning not installed (pip install torch-pruning); skipping", file=sys.stderr)
                continue
            ref = next(r for r in rows if r["method"] == "sparsevit grouped" and abs(r["sparsity"] - sp) < 0.05)
            for crit in ("taylor", "l2"):
                tpm, ratio = torch_pruning_run(dense, args, calib, ref["params"], crit)
                one = evaluate(tpm, tgt_val)
                ft = train(tpm, None, args, tgt, args.finetune_epochs, args.ft_lr)
                acc = evaluate(ft, tgt_val)
                removed = 1 - (n_params(tpm) - (dense_params - _prunable(dense))) / _prunable(dense)
                rows.append(dict(method=f"Torch-Pruning (ratio {ratio:.3f})", criterion=crit, sparsity=removed,
                                 params=n_params(tpm), macs=macs_of(tpm, args.img_size), oneshot=one, acc=acc))
                print(f"# torch-pruning {crit} {sp}: {100 * one:.2f} -> {100 * acc:.2f} ({time.time() - t0:.0f}s)",
                      file=sys.stderr)
    return rows, dict(src_acc=src_acc, dense_acc=dense_acc, seconds=time.time() - t0)


def _prunable(model) -> int:
    return sparsevit.get_adapter(model).count(sparsevit.SparsityPlan.dense(model))["total"]["prunable_before"]


def table(rows, info, args, command: str) -> str:
    d = info["dense_acc"]
    lines = [f"Command: `{command}`  ",
             f"Model: timm `vit_tiny_patch16_224` constructor, img {args.img_size}, patch {args.patch_size}, "
             f"dim {args.dim}, depth {args.depth}, heads {args.heads}; pre-trained {args.pretrain_epochs} epochs on "
             f"digits 0-4 (val top-1 {100 * info['src_acc']:.2f}), new head, {args.transfer_epochs} epochs on 5-9. "
             f"Pruning: {args.num_batches} calibration batches of {args.batch_size}; every pruned model fine-tuned "
             f"{args.finetune_epochs} epochs (AdamW lr {args.ft_lr}, cosine), evaluated after "
             f"`sparsevit.accelerate` on the held-out 25% of 5-9 ({info['seconds']:.0f} s on CPU, seed {args.seed}).",
             "",
             "| method | criterion | prunable removed | params | MACs (M) | top-1 one-shot | top-1 fine-tuned | vs dense |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['criterion']} | {100 * r['sparsity']:.1f}% | {r['params']:,} | "
                     f"{r['macs'] / 1e6:.2f} | {100 * r['oneshot']:.2f} | {100 * r['acc']:.2f} | "
                     f"{100 * r['acc'] / d:.1f}% |")
    return "\n".join(lines)


def write_section(text: str, path: str = RESULTS) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving other sections alone."""
    old = open(path).read() if os.path.exists(path) else "# sparsevit benchmark results\n"
    body = f"{SECTION}\n\n{text}\n"
    pat = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pat.sub(lambda _: body + "\n", old) if pat.search(old) else old.rstrip("\n") + "\n\n" + body
    with open(path, "w") as f:
        f.write(new)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budgets")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ft-lr", type=float, default=5e-4)
    p.add_argument("--pretrain-epochs", type=int, default=30)
    p.add_argument("--transfer-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--num-batches", type=int, default=8)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75])
    p.add_argument("--criteria", nargs="+", default=["l1", "l2", "taylor", "hessian", "random"])
    p.add_argument("--no-unstructured", dest="unstructured", action="store_false")
    p.add_argument("--no-torch-pruning", dest="torch_pruning", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", default=None, help="also write rows as JSON here")
    p.add_argument("--write-results", action="store_true", help=f"write the table into {RESULTS}")
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_epochs, args.transfer_epochs, args.finetune_epochs = 3, 2, 1
        args.depth, args.num_batches, args.sparsities = 2, 2, [0.5]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python bench/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows, info = run(args)
    text = table(rows, info, args, command.strip())
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "info": info, "args": vars(args)}, f, indent=1)
    if args.write_results:
        write_section(text)


if __name__ == "__main__":
    main()
