"""Do engines sharing one process slow each other down? The evidence behind bench/peers.py's isolation.

All engines of bench/peer_engines.py are built in *this* process, one after the other, and measured
with CPU counters (/proc/self/task), which stay meaningful on a busy machine where wall times do not:

    affinity   the CPUs each thread may run on, after each engine's build (does one pin the others?)
    spin       CPU each engine's threads use 0-50, 50-200 and 200-1000 ms after its own call
    shared     CPU per call of each engine (median), first before any engine built after it exists,
               then interleaved with all of them (``--gap`` before each call, as bench/peers.py does);
               and the CPU the *other* engines' threads used during its calls (what they steal)

Threads belong to the engine whose build (or first call) created them; the calling thread and the
torch pool the harness started belong to every engine that runs in them ("harness"). With
``--threads 1`` CPU per call is the cleanest measure of the work an engine does.

    python bench/peers_interference.py --plan blocks70 --engines onnxruntime openvino sparsevit
    python bench/peers_interference.py --threads 1 --rounds 8 --out bench/out/interference.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import peer_engines  # noqa: E402
import peers  # noqa: E402

TICK_MS = 1e3 / os.sysconf("SC_CLK_TCK")
SPIN_WINDOWS = (0.0, 0.05, 0.2, 1.0)


def thread_ticks() -> Dict[int, int]:
    """user + system clock ticks of every live thread of this process."""
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks[int(tid)] = int(fields[11]) + int(fields[12])
        except OSError:  # the thread ended meanwhile
            pass
    return ticks


class Owners:
    """Which engine each thread belongs to, and the CPU a stretch of time cost per engine."""

    def __init__(self):
        self.owner = {tid: "harness" for tid in thread_ticks()}

    def claim(self, engine: str) -> None:
        for tid in thread_ticks():
            self.owner.setdefault(tid, engine)

    def used_ms(self, before: Dict[int, int], after: Dict[int, int]) -> Dict[str, float]:
        used: Dict[str, float] = {}
        for tid, t in after.items():
            delta = t - before.get(tid, t)
            if delta:
                who = self.owner.get(tid, "new")
                used[who] = used.get(who, 0.0) + delta * TICK_MS
        return used

    def affinities(self) -> Dict[str, List[List[int]]]:
        out: Dict[str, List[List[int]]] = {}
        for tid, who in self.owner.items():
            try:
                out.setdefault(who, []).append(sorted(os.sched_getaffinity(tid)))
            except OSError:
                pass
        return out


def measure_call(p, owners: Owners, label: str, gap: float) -> Dict[str, float]:
    time.sleep(gap)
    before = thread_ticks()
    p.timed_call()
    used = owners.used_ms(before, thread_ticks())
    own = sum(v for k, v in used.items() if k in (label, "harness"))
    return {"own": own, "others": sum(used.values()) - own}


def spin_after_call(p, owners: Owners, label: str) -> Dict[str, float]:
    """CPU of the engine's own threads (not the caller's) in each window after its call."""
    time.sleep(1.0)
    p.timed_call()
    out = {}
    for lo, hi in zip(SPIN_WINDOWS, SPIN_WINDOWS[1:]):
        before = thread_ticks()
        time.sleep(hi - lo)
        out[f"{1e3 * lo:.0f}-{1e3 * hi:.0f} ms"] = owners.used_ms(before, thread_ticks()).get(label, 0.0)
    return out


def run(args) -> Dict:
    torch.set_num_threads(args.threads)
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    model = peers.build_model(args.model, args.img_size, kwargs)
    plan = peers.PLANS[args.plan][0](model)
    masked = peers.sparsevit.masked_model(model, plan)
    x = torch.randn(args.batch, 3, *model.patch_embed.img_size)
    with torch.inference_mode():
        masked(x)  # the harness's torch pool exists before any engine, as in bench/peers.py
    owners = Owners()
    ctx = peer_engines.PlanContext(model=model, masked=masked, plan=plan, x=x, threads=args.threads,
                                   workdir=tempfile.mkdtemp(prefix="sparsevit-interference-"), tag=args.plan)
    engines = peer_engines.make_engines(args.engines, ["f32"])
    prepared, before_others, affinity = {}, {}, {}
    for engine in engines:  # each engine's CPU per call is taken before the engines after it exist
        p = prepared[engine.label] = engine.prepare(ctx)
        p.timed_call()
        owners.claim(engine.label)
        affinity[engine.label] = owners.affinities()
        before_others[engine.label] = [measure_call(p, owners, engine.label, args.gap)["own"]
                                       for _ in range(args.rounds)]
    shared: Dict[str, List[Dict[str, float]]] = {label: [] for label in prepared}
    for _ in range(args.rounds):
        for label, p in prepared.items():
            shared[label].append(measure_call(p, owners, label, args.gap))
    result = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "affinity_after_build": affinity,
              "spin_ms": {label: spin_after_call(p, owners, label) for label, p in prepared.items()},
              "cpu_ms_per_call": {}}
    for label in prepared:
        result["cpu_ms_per_call"][label] = {
            "built_before_the_rest": statistics.median(before_others[label]),
            "interleaved_with_all": statistics.median(c["own"] for c in shared[label]),
            "others_during_its_calls_total": sum(c["others"] for c in shared[label])}
    for p in prepared.values():
        p.close()
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--model-kwargs", default="")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--plan", default="blocks70", choices=list(peers.PLANS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--gap", type=float, default=0.05)
    p.add_argument("--engines", nargs="+", default=["onnxruntime", "openvino", "torch-eager", "sparsevit"],
                   choices=[n for n in peer_engines.ENGINE_TYPES if n != "deepsparse"])
    p.add_argument("--out", default=None, help="write the result as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> Dict:
    """Measure and print (and with ``--out`` write) the three tables as JSON."""
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=1)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
