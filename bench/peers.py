"""CPU speed against what users would pick instead: one run, every engine side by side, per plan.

For each plan (rows) every engine (columns) runs the same model with the same random weights and
masks on the same input: timm in PyTorch eager, torch.compile (Inductor, freezing), ONNX Runtime and
OpenVINO on an ONNX export of the masked dense model, OpenVINO on sparsevit's structurally sliced
model (``openvino-sliced``: the bar for sparsevit's dense layers), DeepSparse (in its own venv, when
``--deepsparse-python`` is given) on an opset-14 export of it, and ``sparsevit.accelerate``.
Every plan of a batch is built first; then all its cells (plan x engine) are timed in the same
interleaved rounds (each round: every engine on the dense plan, then every engine on the next plan,
..., then again), so a slow spell of the shared host falls on every row alike and the ratios, which
divide one row by the dense row, are not skewed by when a row was timed. There is a short sleep
(``--gap``) before every timed call and every build (idle ORT / OpenMP threads keep spinning for a
while after a call and would steal the next engine's cores; sparsevit's per-layer kernel chooser
measures while it builds); after the sleep the harness also waits (up to 1 s) until no worker
process uses CPU. The cell is the median of ``--rounds`` after ``--warmup``. Each turn runs one
forward by default: every other cell ran since its last call, so its weights and activations start
cold. ``--calls-per-turn K`` runs K forwards back to back in each turn and times the last: the
steady state of a server that calls one model over and over (the other cells still run between
turns). The ratio is to the fastest engine on the dense plan in the same dtype (bf16 engines
against bf16 engines), > 1 is faster. Every engine's output is checked against PyTorch fp32 on the
masked dense model: max relative error = max|y - ref| / max|ref|.

Isolation (``--isolation process``, the default): every engine runs in its own worker process
(bench/peer_worker.py; DeepSparse in bench/deepsparse_worker.py under its own python), spawned once
for the run with ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = ``--threads``, importing only its own
runtime; the harness writes the weights (safetensors), plan (JSON), input (.npy) and ONNX exports
once and every worker reads the same files. Each call is timed inside its worker (the pipe is not
counted). Around every timed call the harness reads the CPU time (/proc) of every process of the
run: the JSON's ``cpu`` per cell gives the engine's own CPU per call and what all *other* processes
(idle workers, harness) used meanwhile, and the Markdown says the total: the check that idle peers
stay idle. ``--isolation none`` runs every engine in the harness's process (how the tables before
2026-11-22 06:00 were made) to reproduce the interference: in one process the engines' thread pools,
allocators and pinning act on each other, and sparsevit's kernel chooser measures while others'
threads may still be busy (see bench/PEERS.md, "Method: one process per engine").

Plans (the public pruning API, l1 magnitudes of the random weights):
    dense                 nothing removed
    unstructured70/90     prune(method="magnitude_unstructured", criterion="l1", sparsity=0.7/0.9)
    blocks70              the same with block=(32, 32)
    heads_mlp50           prune(method="grouped", criterion="l1", sparsity=0.5): heads + MLP channels
    heads_mlp50+blocks70  heads_mlp50, then 70% of the 32x32 tiles of what it keeps (tiles laid on
                          the kept rows/columns, l1 per layer, so they are whole tiles after slicing)

ONNX Runtime runs f32 only (its x86 CPU provider is not given a bf16 graph); DeepSparse runs f32.
OpenVINO's default precision on CPUs with AVX512_BF16 is bf16: it is always set explicitly, and the
JSON records what the compiled model reports. Install the peers with ``bash bench/setup_peers.sh``.

    python bench/peers.py                                            # DeiT-S 224, batch 8, fp32 + bf16
    python bench/peers.py --batch 8 1 --rounds 10 --deepsparse-python ~/.cache/sparsevit/deepsparse-venv/bin/python
    python bench/peers.py --engines torch-eager openvino sparsevit --plans dense blocks70 --dtype f32
    python bench/peers.py --model vit_tiny_patch16_224 --img-size 32 --model-kwargs '{"depth": 2}' --rounds 2
    python bench/peers.py --plans blocks70 --dtype f32 --engines openvino sparsevit --isolation none

Writes ``peers.json``, ``peers.md`` and ``peers_b{batch}.png`` into ``--out`` (default bench/out/).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import sparsevit  # noqa: E402
from peer_engines import ENGINE_TYPES, Engine, PlanContext, Prepared, make_engines  # noqa: E402

BLOCK = (32, 32)
PANEL_UNSTRUCTURED, PANEL_STRUCTURED = "unstructured", "structured + 32x32 blocks"


# ----------------------------------------------------------------------------- plans
def _unstructured(sparsity: float, block=None) -> Callable:
    def build(model):
        return sparsevit.prune(model, method="magnitude_unstructured", criterion="l1", sparsity=sparsity,
                               block=block, progress=False)
    return build


def _heads_mlp(frac: float = 0.5) -> Callable:
    def build(model):
        return sparsevit.prune(model, method="grouped", criterion="l1", sparsity=frac, progress=False)
    return build


def tiles_on_kept(masked: nn.Module, sparsity: float, block=BLOCK) -> Dict[str, torch.Tensor]:
    """Per block Linear, a mask that removes the ``sparsity`` fraction of lowest-l1 ``block`` tiles of
    the weight *after* structural slicing: the tiles are laid over the kept rows and columns (those with
    any non-zero in the masked model), so they stay whole tiles in the sliced weight. Masks are in the
    original shape, False on what the structure already removed."""
    masks = {}
    for name, lin in sparsevit.get_adapter(masked).linear_modules().items():
        w = lin.weight.detach().float()
        rows, cols = w.abs().sum(1).nonzero().flatten(), w.abs().sum(0).nonzero().flatten()
        if len(rows) == 0 or len(cols) == 0:
            continue
        kept = w[rows][:, cols].abs()
        br, bc = block
        nr, nc = -(-kept.shape[0] // br), -(-kept.shape[1] // bc)
        padded = torch.zeros(nr * br, nc * bc)
        padded[:kept.shape[0], :kept.shape[1]] = kept
        tile_l1 = padded.view(nr, br, nc, bc).sum((1, 3)).flatten()
        keep_tiles = torch.ones(nr * nc, dtype=torch.bool)
        keep_tiles[tile_l1.argsort()[:round(sparsity * nr * nc)]] = False
        keep = keep_tiles.view(nr, nc).repeat_interleave(br, 0).repeat_interleave(bc, 1)
        mask = torch.zeros(w.shape, dtype=torch.bool)
        mask[rows.unsqueeze(1), cols.unsqueeze(0)] = keep[:kept.shape[0], :kept.shape[1]]
        masks[name] = mask
    return masks


def _heads_mlp_then_blocks(frac: float = 0.5, sparsity: float = 0.7) -> Callable:
    def build(model):
        plan = _heads_mlp(frac)(model).copy()
        plan.masks = tiles_on_kept(sparsevit.masked_model(model, plan), sparsity)
        plan.block = list(BLOCK)
        plan.meta["then"] = f"{sparsity:.0%} of the {BLOCK[0]}x{BLOCK[1]} tiles of the kept weights (l1, per layer)"
        return plan
    return build


# name -> (builder, plot panels, label in tables)
PLANS: Dict[str, Tuple[Callable, Tuple[str, ...], str]] = {
    "dense": (lambda m: sparsevit.SparsityPlan.dense(m), (PANEL_UNSTRUCTURED, PANEL_STRUCTURED), "dense"),
    "unstructured70": (_unstructured(0.7), (PANEL_UNSTRUCTURED,), "unstructured 70%"),
    "unstructured90": (_unstructured(0.9), (PANEL_UNSTRUCTURED,), "unstructured 90%"),
    "blocks70": (_unstructured(0.7, BLOCK), (PANEL_STRUCTURED,), "32x32 blocks 70%"),
    "heads_mlp50": (_heads_mlp(0.5), (PANEL_STRUCTURED,), "50% heads+MLP"),
    "heads_mlp50+blocks70": (_heads_mlp_then_blocks(0.5, 0.7), (PANEL_STRUCTURED,),
                             "50% heads+MLP, then 32x32 blocks 70%"),
}


# ----------------------------------------------------------------------------- model
def build_model(name: str, img_size: Optional[int], kwargs: Dict, seed: int = 0) -> nn.Module:
    """A timm model with random weights (no download). timm initialises biases and norms to 0/1;
    a small random offset on every parameter makes them non-trivial, so the output check sees them."""
    import timm

    torch.manual_seed(seed)
    if img_size:
        kwargs = dict(kwargs, img_size=img_size)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def max_rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ----------------------------------------------------------------------------- timing
def cpu_ticks(pid: int, descendants: bool = True) -> int:
    """CPU time (user + system, clock ticks) a process (and its live descendants) used; 0 once gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        children = []
        for tid in os.listdir(f"/proc/{pid}/task") if descendants else []:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children += [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        return 0
    return int(fields[11]) + int(fields[12]) + sum(cpu_ticks(c) for c in children)


def wait_until_idle(pids: List[int], poll: float = 0.02, limit: float = 1.0) -> float:
    """Wait (at most ``limit`` s) until none of ``pids`` used CPU during one ``poll`` interval: a thread
    pool still spinning after its call (ONNX Runtime's outlasts a 50 ms gap) stops before the next
    engine is timed or built. Returns the seconds waited."""
    t0 = time.perf_counter()
    last = [cpu_ticks(pid) for pid in pids]
    while pids and time.perf_counter() - t0 < limit:
        time.sleep(poll)
        now = [cpu_ticks(pid) for pid in pids]
        if now == last:
            break
        last = now
    return time.perf_counter() - t0


class CpuWatch:
    """Per timed call, the CPU used by the timed cell's process and by every *other* process of the
    run (idle workers, the harness): the proof that nothing else runs while an engine is timed.
    Cells are keyed by a label or a (plan, label) pair; the cells of one engine share its worker
    process, which is named by the label. Only meaningful when engines have their own processes
    (``Prepared.pid``)."""
    TICK_MS = 1e3 / os.sysconf("SC_CLK_TCK")

    def __init__(self, prepared: Dict[object, Prepared]):
        self.pids: Dict[str, int] = {}      # process name -> pid
        self.process: Dict[object, str] = {}  # cell key -> its process's name
        for key, p in prepared.items():
            if p.pid is None:
                continue
            name = next((n for n, pid in self.pids.items() if pid == p.pid), None)
            if name is None:  # DeepSparse runs one process per plan: the later ones get their pid
                label = key if isinstance(key, str) else key[1]
                name = label if label not in self.pids else f"{label} (pid {p.pid})"
                self.pids[name] = p.pid
            self.process[key] = name
        self.pids["harness"] = os.getpid()
        self.own_ms: Dict[object, List[float]] = {k: [] for k in prepared}
        self.others_ms: Dict[object, List[float]] = {k: [] for k in prepared}
        self.by_process: Dict[object, Dict[str, float]] = {k: {} for k in prepared}

    def settle(self) -> float:
        """Wait until no worker process uses CPU (see :func:`wait_until_idle`); returns the seconds waited."""
        return wait_until_idle([pid for name, pid in self.pids.items() if name != "harness"])

    def snapshot(self) -> Dict[str, int]:
        # the harness without its descendants: those are the workers, counted on their own
        return {name: cpu_ticks(pid, descendants=name != "harness") for name, pid in self.pids.items()}

    def record(self, key, before: Dict[str, int], after: Dict[str, int]) -> None:
        used = {k: (after[k] - before[k]) * self.TICK_MS for k in before}
        own = self.process.get(key)
        self.own_ms[key].append(used.get(own, float("nan")))
        self.others_ms[key].append(sum(v for k, v in used.items() if k != own))
        for k, v in used.items():
            if k != own and v:
                self.by_process[key][k] = self.by_process[key].get(k, 0.0) + v

    def summary(self, key) -> Dict:
        own, others = self.own_ms[key], self.others_ms[key]
        if not others or key not in self.process:
            return {}
        return {"own_cpu_ms_median": statistics.median(own), "others_cpu_ms_total": sum(others),
                "others_cpu_ms_max": max(others), "calls": len(others),
                "others_by_process": self.by_process[key]}


def time_interleaved(prepared: Dict[object, Prepared], rounds: int, warmup: int, gap: float,
                     desc: str = "", failures: Optional[Dict[object, str]] = None,
                     watch: Optional[CpuWatch] = None, calls: int = 1) -> Dict[object, List[float]]:
    """Seconds per call for each cell (an engine, or one plan's engine): every round gives each cell
    a turn, sleeping ``gap`` seconds before each call so the previous engine's spinning threads go idle
    first (with ``watch``, then also until no worker process uses CPU, see :meth:`CpuWatch.settle`).
    A turn runs ``calls`` forwards back to back and records the last one's time. A cell whose call
    raises is dropped from ``prepared`` (closed) and its error recorded in ``failures``. With
    ``watch``, the CPU every process used during each timed call is recorded there."""
    from tqdm import tqdm

    failures = {} if failures is None else failures
    times: Dict[object, List[float]] = {k: [] for k in prepared}
    for r in tqdm(range(warmup + rounds), desc=desc, disable=None, leave=False):
        for key, p in list(prepared.items()):
            time.sleep(gap)
            if watch is not None and gap > 0:
                watch.settle()
            try:
                before = watch.snapshot() if watch and r >= warmup else None
                seconds = p.timed_call(calls)
                if before is not None:
                    watch.record(key, before, watch.snapshot())
            except Exception as e:  # recorded as this cell's result; the others go on
                failures[key] = f"failed while timed: {type(e).__name__}: {e}"[:300]
                prepared.pop(key).close()
                times.pop(key)
                continue
            if r >= warmup:
                times[key].append(seconds)
    return times


def prepare_all(engines: List[Engine], ctx: PlanContext, failures: Dict[str, str],
                gap: float = 0.0) -> Dict[str, Prepared]:
    """Build every engine for this plan; one that fails is recorded with its error and left out."""
    prepared = {}
    for engine in engines:
        if engine.label in failures:
            continue
        time.sleep(gap)  # engines that measure while they build (sparsevit's chooser) get quiet cores
        if gap > 0:
            wait_until_idle([w.pid for w in (getattr(e, "worker", None) for e in engines) if w is not None])
        try:
            prepared[engine.label] = engine.prepare(ctx)
        except Exception as e:  # a peer that cannot take this model is a result, not a crash
            failures[engine.label] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print(f"# {ctx.tag}: {engine.label} failed: {failures[engine.label]}", file=sys.stderr)
            if os.environ.get("PEERS_DEBUG"):
                traceback.print_exc()
    return prepared


def plan_context(plan_name: str, model: nn.Module, x: torch.Tensor, args, workdir: str,
                 model_spec: Dict) -> Tuple[PlanContext, torch.Tensor, Dict]:
    """One plan's context for the engines, the reference output (PyTorch fp32 on the masked dense
    model) and the plan's totals (MACs, share removed)."""
    builder, _, _ = PLANS[plan_name]
    plan = builder(model)
    masked = sparsevit.masked_model(model, plan)
    with torch.inference_mode():
        ref = masked(x).float()
    ctx = PlanContext(model=model, masked=masked, plan=plan, x=x, threads=args.threads, workdir=workdir,
                      tag=f"{plan_name}.b{x.shape[0]}", model_spec=model_spec)
    return ctx, ref, plan.summary(model, as_dict=True)["total"]


def run_batch(model: nn.Module, x: torch.Tensor, engines: List[Engine], args, workdir: str,
              model_spec: Dict) -> List[Dict]:
    """Every plan x engine cell of one batch, timed in the same interleaved rounds: each round gives
    every cell one turn, plan after plan. The ratios divide one plan's time by the dense plan's, so
    a slow spell of the shared host must fall on every plan alike, not on the plans timed last."""
    contexts, failures, prepared = {}, {}, {}
    try:
        for plan_name in args.plans:
            t0 = time.perf_counter()
            contexts[plan_name] = plan_context(plan_name, model, x, args, workdir, model_spec)
            failures[plan_name] = {e.label: why for e in engines if (why := e.missing())}
            for label, p in prepare_all(engines, contexts[plan_name][0], failures[plan_name], args.gap).items():
                prepared[(plan_name, label)] = p
            print(f"# batch {x.shape[0]} {plan_name}: built in {time.perf_counter() - t0:.0f} s", flush=True)
        watch = CpuWatch(prepared)
        timing_failures: Dict[Tuple[str, str], str] = {}
        times = time_interleaved(prepared, args.rounds, args.warmup, args.gap, f"b{x.shape[0]}",
                                 timing_failures, watch, args.calls_per_turn)
        rows = []
        for plan_name, (ctx, ref, stats) in contexts.items():
            for engine in engines:
                key = (plan_name, engine.label)
                row = {"batch": x.shape[0], "plan": plan_name, "engine": engine.name, "dtype": engine.dtype,
                       "label": engine.label, "prunable_removed": stats["prunable_removed"],
                       "mac_reduction": stats["mac_ratio"]}
                p = prepared.get(key)
                if p is None:
                    row["skipped"] = timing_failures.get(key) or failures[plan_name].get(engine.label, "not prepared")
                else:
                    t = times[key]
                    row.update(median_ms=1e3 * statistics.median(t), min_ms=1e3 * min(t),
                               times_ms=[round(1e3 * s, 3) for s in t], info=p.info,
                               max_rel_err=max_rel_error(torch.from_numpy(p.output()), ref),
                               cpu=watch.summary(key))
                rows.append(row)
        return rows
    finally:
        for p in prepared.values():
            p.close()
        for ctx, _, _ in contexts.values():
            for path in ctx._files.values():
                os.remove(path)


def add_ratios(rows: List[Dict]) -> None:
    """ratio = (fastest engine of the same dtype and batch on the dense plan) / this engine's time."""
    for row in rows:
        dense = [r["median_ms"] for r in rows if r["plan"] == "dense" and r["dtype"] == row["dtype"]
                 and r["batch"] == row["batch"] and "median_ms" in r]
        if "median_ms" in row and dense:
            row["ratio"] = min(dense) / row["median_ms"]
            row["reference_ms"] = min(dense)


# ----------------------------------------------------------------------------- output
def machine_info(args) -> Dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("timm", "onnx", "onnxruntime", "openvino"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": args.threads, "versions": versions,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "python bench/peers.py " + " ".join(shlex.quote(a) for a in args.argv)}


def _cell(row: Optional[Dict]) -> str:
    if row is None:
        return ""
    if "median_ms" not in row:
        return "n/a"
    ratio = f" ({row['ratio']:.2f}x)" if "ratio" in row else ""
    return f"{row['median_ms']:.1f}{ratio}"


def cpu_lines(rows: List[Dict], meta: Dict) -> List[str]:
    """How isolated the engines were: the CPU other processes used while each engine was timed."""
    if meta.get("isolation", "none") != "process":
        return ["Isolation: none (every engine in the harness's process; DeepSparse in its own).", ""]
    watched = [r for r in rows if r.get("cpu")]
    total = sum(r["cpu"]["others_cpu_ms_total"] for r in watched)
    calls = sum(r["cpu"]["calls"] for r in watched)
    worst = max((r["cpu"]["others_cpu_ms_max"] for r in watched), default=0.0)
    wall = sum(sum(r["times_ms"]) for r in watched)
    share = 100 * total / max(wall, 1e-9)
    return [f"Isolation: each engine in its own worker process. CPU used by all other processes (idle "
            f"workers, harness) during the {calls} timed calls: {total:.0f} ms in total ({share:.1f}% of "
            f"their {wall:.0f} ms), at most {worst:.0f} ms during one call (clock ticks of "
            f"{CpuWatch.TICK_MS:.0f} ms).", ""]


def _turn_words(calls: int) -> str:
    if calls == 1:
        return "one forward a turn (caches cold after the other engines' turns)"
    return f"{calls} forwards back to back a turn, the last timed (caches warm)"


def markdown(rows: List[Dict], meta: Dict) -> str:
    """Per batch: a time table (ms, ratio) and an error table; rows = plans, columns = engines."""
    out = [f"Command: `{meta['command']}`  ",
           f"Machine: {meta['cpu']}, {meta['threads']} threads per engine; {meta['date']}  ",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "  ",
           f"Median of {meta['rounds']} rounds after {meta['warmup']} warm-up, each round one turn of every "
           "plan x engine cell of the batch, "
           f"{1e3 * meta['gap']:.0f} ms gap between turns, {_turn_words(meta.get('calls_per_turn', 1))}; "
           "ratio to the fastest dense engine of the same dtype.", ""]
    for batch in dict.fromkeys(r["batch"] for r in rows):
        mine = [r for r in rows if r["batch"] == batch]
        labels = list(dict.fromkeys(r["label"] for r in mine))
        plans = list(dict.fromkeys(r["plan"] for r in mine))
        by = {(r["plan"], r["label"]): r for r in mine}
        head = "| plan | MAC reduction | " + " | ".join(labels) + " |"
        rule = "|---|---:|" + "---:|" * len(labels)
        out += [f"### batch {batch}: ms (ratio)", "", head, rule]
        for plan in plans:
            first = next(r for r in mine if r["plan"] == plan)
            out.append(f"| {PLANS[plan][2]} | {first['mac_reduction']:.2f}x | "
                       + " | ".join(_cell(by.get((plan, lb))) for lb in labels) + " |")
        out += ["", f"### batch {batch}: max relative error vs PyTorch fp32 (masked dense model)", "", head, rule]
        for plan in plans:
            first = next(r for r in mine if r["plan"] == plan)
            cells = [f"{by[(plan, lb)]['max_rel_err']:.1e}" if "max_rel_err" in by.get((plan, lb), {}) else "n/a"
                     for lb in labels]
            out.append(f"| {PLANS[plan][2]} | {first['mac_reduction']:.2f}x | " + " | ".join(cells) + " |")
        out.append("")
    out += cpu_lines(rows, meta)
    skipped = {r["label"]: r["skipped"] for r in rows if "skipped" in r}
    if skipped:
        out += ["Not measured: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()), ""]
    return "\n".join(out)


def plot(rows: List[Dict], path: str, title: str) -> Optional[str]:
    try:
        from plots import speedup_vs_sparsity
    except ImportError:
        return None
    points = [{"engine": r["label"], "sparsity": r["prunable_removed"], "speedup": r["ratio"], "panel": panel}
              for r in rows if "ratio" in r for panel in PLANS[r["plan"]][1]]
    if not points:
        return None
    try:
        return speedup_vs_sparsity(points, path, title=title, reference="vs fastest dense engine, same dtype",
                                   panels=[PANEL_UNSTRUCTURED, PANEL_STRUCTURED])
    except ImportError:  # matplotlib absent: tables only
        print("# matplotlib not installed: no plot (bash bench/setup_peers.sh)", file=sys.stderr)
        return None


def write_outputs(rows: List[Dict], meta: Dict, out_dir: str, prefix: str = "peers") -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, prefix + ".json"), "md": os.path.join(out_dir, prefix + ".md")}
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(rows, meta) + "\n")
    for batch in dict.fromkeys(r["batch"] for r in rows):
        png = plot([r for r in rows if r["batch"] == batch], os.path.join(out_dir, f"{prefix}_b{batch}.png"),
                   f"{meta['model']}, batch {batch}, {meta['threads']} threads ({meta['cpu']})")
        if png:
            paths[f"png_b{batch}"] = png
    return paths


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--model-kwargs", default="", help="JSON kwargs for timm.create_model, e.g. '{\"depth\": 2}'")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (smaller for quick runs)")
    p.add_argument("--batch", type=int, nargs="+", default=[8])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gap", type=float, default=0.05, help="seconds of sleep before each timed call")
    p.add_argument("--calls-per-turn", type=int, default=1,
                   help="forwards back to back in each engine's turn, the last one timed (1: a cold call "
                        "after the other engines' turns; 3: warm caches, a server's steady state)")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine")
    p.add_argument("--isolation", default="process", choices=["process", "none"],
                   help="process: each engine in its own worker process (fair); none: all in this one "
                        "(only to reproduce how engines in one process slow each other down)")
    p.add_argument("--engines", nargs="+", default=list(ENGINE_TYPES), choices=list(ENGINE_TYPES))
    p.add_argument("--plans", nargs="+", default=list(PLANS), choices=list(PLANS))
    p.add_argument("--dtype", nargs="+", default=["f32", "bf16"], choices=["f32", "bf16"])
    p.add_argument("--compile-mode", default="default", choices=["default", "max-autotune-no-cudagraphs"])
    p.add_argument("--deepsparse-python", default=None, help="python of DeepSparse's venv (bench/setup_peers.sh)")
    p.add_argument("--out", default=os.path.join(HERE, "out"), help="output folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.calls_per_turn < 1:
        p.error(f"--calls-per-turn must be at least 1 (got {args.calls_per_turn})")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if "dense" not in args.plans:
        print("# no dense plan: ratios are left out (they are relative to the fastest dense engine)", file=sys.stderr)
    return args


def main(argv=None) -> Dict:
    """Run the comparison; returns {"meta", "rows", "paths"} (also written to ``--out``)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    model = build_model(args.model, args.img_size, kwargs, args.seed)
    size = model.patch_embed.img_size
    model_spec = {"name": args.model, "kwargs": dict(kwargs, img_size=args.img_size) if args.img_size else kwargs}
    engines = make_engines(args.engines, args.dtype, args.deepsparse_python, args.compile_mode,
                           isolate=args.isolation == "process")
    meta = dict(machine_info(args), model=args.model, img_size=list(size), rounds=args.rounds,
                warmup=args.warmup, gap=args.gap, isolation=args.isolation, calls_per_turn=args.calls_per_turn)
    print(f"# peers: {args.model} {tuple(size)}, batch {args.batch}, {args.threads} threads, engines "
          f"{[e.label for e in engines]}", flush=True)
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory(prefix="sparsevit-peers-") as workdir:
        try:
            for batch in args.batch:
                g = torch.Generator().manual_seed(args.seed + batch)
                x = torch.randn(batch, 3, *size, generator=g)
                t0 = time.perf_counter()
                new = run_batch(model, x, engines, args, workdir, model_spec)
                rows += new
                print(f"# batch {batch} timed ({time.perf_counter() - t0:.0f} s)", flush=True)
                for plan_name in args.plans:
                    print(f"# batch {batch} {plan_name}: " + "; ".join(
                        f"{r['label']} {r['median_ms']:.1f} ms err {r['max_rel_err']:.1e}"
                        for r in new if "median_ms" in r and r["plan"] == plan_name), flush=True)
        finally:
            for engine in engines:
                engine.shutdown()
    add_ratios(rows)
    paths = write_outputs(rows, meta, args.out)
    print(markdown(rows, meta))
    print("# wrote " + ", ".join(paths.values()))
    return {"meta": meta, "rows": rows, "paths": paths}


if __name__ == "__main__":
    main()
