"""Smoke test of bench/peers.py: the comparison harness runs end to end on a 2-block ViT at 32x32 with
whichever peers are installed, skips the others with a reason, and every engine's output agrees with
PyTorch fp32 on the masked dense model. Times are produced but never checked (speed lives in bench/).
Each engine runs in its own worker process: the tests check that a worker rebuilds exactly the
harness's model and masks, loads only its own runtime, and that the CPU watch charges CPU used during
a timed call to the process that used it.

DeepSparse is exercised only when SPARSEVIT_DEEPSPARSE_PYTHON names its venv's python
(bash bench/setup_peers.sh makes one)."""
import importlib.util
import io
import json
import os
import subprocess
import sys
import time

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
import deepsparse_worker  # noqa: E402
import peer_engines  # noqa: E402
import peers  # noqa: E402

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--model-kwargs", '{"depth": 2}']


def _installed(*modules):
    return all(importlib.util.find_spec(m) is not None for m in modules)


def test_tiles_on_kept_are_whole_tiles_after_slicing():
    model = peers.build_model("vit_tiny_patch16_224", 32, {"depth": 2})
    structured = peers.sparsevit.SparsityPlan.dense(model)
    for i in range(2):  # heads 0 and 2 of 3, every other MLP channel: the kept rows are scattered
        structured.blocks[i] = peers.sparsevit.BlockPlan(heads=[0, 2], mlp_channels=list(range(0, 768, 2)))
    masked = peers.sparsevit.masked_model(model, structured)
    masks = peers.tiles_on_kept(masked, 0.7)
    assert set(masks) == set(peers.sparsevit.get_adapter(masked).linear_modules())
    for name, lin in peers.sparsevit.get_adapter(masked).linear_modules().items():
        w = lin.weight.detach()
        kept_rows, kept_cols = w.abs().sum(1) != 0, w.abs().sum(0) != 0
        assert not masks[name][~kept_rows].any() and not masks[name][:, ~kept_cols].any(), \
            f"{name}: the mask keeps weights the structure removed"
        sliced = masks[name][kept_rows][:, kept_cols]
        r, c = sliced.shape
        assert r % 32 == 0 and c % 32 == 0, f"{name}: kept shape {tuple(sliced.shape)} not tile-aligned"
        tiles = sliced.view(r // 32, 32, c // 32, 32).float().mean((1, 3))
        assert ((tiles == 0) | (tiles == 1)).all(), f"{name}: a 32x32 tile of the sliced weight is split"
        removed = 1 - float(tiles.mean())
        assert abs(removed - 0.7) <= 0.5 / tiles.numel() + 1e-6, f"{name}: {removed:.3f} of tiles removed"


def test_harness_runs_and_outputs_agree(tmp_path):
    ds_python = os.environ.get("SPARSEVIT_DEEPSPARSE_PYTHON")
    engines = ["torch-eager", "onnxruntime", "openvino", "openvino-sliced", "sparsevit"] + \
        (["deepsparse"] if ds_python else [])
    argv = TINY + ["--batch", "3", "--rounds", "1", "--warmup", "0", "--gap", "0", "--dtype", "f32",
                   "--plans", "dense", "heads_mlp50+blocks70", "--engines", *engines, "--out", str(tmp_path)]
    if ds_python:
        argv += ["--deepsparse-python", ds_python]
    result = peers.main(argv)
    rows = {(r["plan"], r["engine"]): r for r in result["rows"]}
    expected = {"torch-eager": True, "sparsevit": True, "deepsparse": bool(ds_python),
                "onnxruntime": _installed("onnx", "onnxruntime"), "openvino": _installed("onnx", "openvino"),
                "openvino-sliced": _installed("onnx", "onnxscript", "openvino")}
    for plan in ("dense", "heads_mlp50+blocks70"):
        for engine in engines:
            row = rows[(plan, engine)]
            if not expected[engine]:
                assert "skipped" in row and "not installed" in row["skipped"], row
                continue
            assert "skipped" not in row, f"{engine} on {plan} failed: {row.get('skipped')}"
            assert row["median_ms"] > 0 and row["batch"] == 3
            assert row["max_rel_err"] < 1e-4, f"{engine} on {plan}: max relative error {row['max_rel_err']:.2e}"
    assert rows[("heads_mlp50+blocks70", "sparsevit")]["mac_reduction"] > 2.0
    pids = set()
    for engine in engines:  # isolation: one worker per engine for the whole run, only its own runtime
        if not expected[engine] or engine == "deepsparse":
            continue
        workers = [rows[(plan, engine)]["info"]["worker"] for plan in ("dense", "heads_mlp50+blocks70")]
        assert workers[0]["pid"] == workers[1]["pid"] != os.getpid()
        pids.add(workers[0]["pid"])
        assert ("torch" in workers[0]["runtimes"]) == (engine in ("torch-eager", "sparsevit")), workers[0]
        assert rows[("dense", engine)]["cpu"]["calls"] == 1
    assert len(pids) == sum(expected[e] for e in engines if e != "deepsparse")
    assert max(r["ratio"] for r in result["rows"] if r["plan"] == "dense" and "ratio" in r) == pytest.approx(1.0)
    saved = json.loads((tmp_path / "peers.json").read_text())
    assert len(saved["rows"]) == len(result["rows"]) and saved["meta"]["threads"] == 2
    table = (tmp_path / "peers.md").read_text()
    assert "50% heads+MLP, then 32x32 blocks 70%" in table and "max relative error" in table
    if _installed("matplotlib"):
        assert (tmp_path / "peers_b3.png").stat().st_size > 1000


def test_deepsparse_without_python_is_skipped_with_reason():
    engine = peers.make_engines(["deepsparse"], ["f32", "bf16"])
    assert [e.label for e in engine] == ["deepsparse f32"]
    assert "--deepsparse-python" in engine[0].missing()


def test_max_rel_error_scales_by_reference():
    ref = torch.tensor([[2.0, -4.0], [1.0, 0.5]])
    assert peers.max_rel_error(ref, ref) == 0.0
    assert peers.max_rel_error(ref + torch.tensor([[0.0, 0.4], [0.0, 0.0]]), ref) == pytest.approx(0.1)


def test_worker_context_rebuilds_the_same_model_and_masks(tmp_path):
    model = peers.build_model("vit_tiny_patch16_224", 32, {"depth": 2})
    plan = peers.PLANS["heads_mlp50+blocks70"][0](model)
    masked = peers.sparsevit.masked_model(model, plan)
    x = torch.randn(2, 3, 32, 32)
    ctx = peer_engines.PlanContext(model=model, masked=masked, plan=plan, x=x, threads=1, workdir=str(tmp_path),
                                   tag="t.b2", model_spec={"name": "vit_tiny_patch16_224",
                                                           "kwargs": {"depth": 2, "img_size": 32}})
    spec = json.loads(json.dumps(ctx.worker_spec(("model",))))  # what crosses the pipe
    remote = peer_engines.WorkerContext(spec)
    assert torch.equal(remote.x, x) and remote.batch == 2
    assert sorted(remote.plan.masks) == sorted(plan.masks)
    for name, mask in plan.masks.items():
        assert torch.equal(remote.plan.masks[name], mask), name
    with torch.inference_mode():
        assert torch.equal(remote.masked(x), masked(x))


def test_cpu_watch_charges_the_process_that_used_the_cpu():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.2)
        idle = peer_engines.Prepared(lambda: time.sleep(0.5) or 0.5, lambda: None, pid=sleeper.pid)
        spinning = peer_engines.Prepared(lambda: 0.0, lambda: None, pid=busy.pid)
        watch = peers.CpuWatch({"timed": idle, "spinning": spinning})
        before = watch.snapshot()
        idle.timed_call()
        watch.record("timed", before, watch.snapshot())
        assert peers.wait_until_idle([sleeper.pid], limit=5.0) < 2.0  # nothing spins: no wait
    finally:
        for proc in (busy, sleeper):
            proc.kill()
            proc.wait()
    summary = watch.summary("timed")
    assert summary["calls"] == 1 and summary["others_cpu_ms_total"] >= 20, summary
    assert summary["others_by_process"].get("spinning", 0) >= 20, summary
    assert summary["others_by_process"].get("harness", 0) < summary["others_by_process"]["spinning"]
    assert summary["own_cpu_ms_median"] <= 20, summary
    in_process = peer_engines.Prepared(lambda: 0.0, lambda: None)
    assert peers.CpuWatch({"timed": in_process}).summary("timed") == {}  # its CPU is the harness's: not watched


def test_worker_protocol_answers_errors_and_keeps_serving():
    class Echo:
        commands = ("run",)

        def run(self, fail=False):
            if fail:
                raise ValueError("asked to fail")
            return {"seconds": 1.0}

    requests = io.StringIO("\n".join(json.dumps(r) for r in (
        {"cmd": "run", "fail": True}, {"cmd": "nope"}, {"cmd": "run"}, {"cmd": "quit"}, {"cmd": "run"})))
    reply = io.StringIO()
    deepsparse_worker.serve(requests, reply, Echo())
    answers = [json.loads(line) for line in reply.getvalue().splitlines()]
    assert answers == [{"ok": False, "error": "ValueError: asked to fail"},
                       {"ok": False, "error": "ValueError: unknown command 'nope'"},
                       {"ok": True, "seconds": 1.0}]


def test_in_process_mode_still_runs(tmp_path):
    argv = TINY + ["--batch", "2", "--rounds", "1", "--warmup", "0", "--gap", "0", "--dtype", "f32",
                   "--plans", "dense", "--engines", "torch-eager", "sparsevit", "--isolation", "none",
                   "--out", str(tmp_path)]
    rows = peers.main(argv)["rows"]
    assert [r["engine"] for r in rows] == ["torch-eager", "sparsevit"]
    for row in rows:
        assert row["max_rel_err"] < 1e-4 and row["cpu"] == {} and "worker" not in row["info"]
    assert "Isolation: none" in (tmp_path / "peers.md").read_text()


def test_interference_probe_attributes_threads_to_engines(tmp_path):
    import peers_interference

    engines = ["sparsevit"] + (["onnxruntime"] if _installed("onnx", "onnxruntime") else [])
    out = tmp_path / "interference.json"
    result = peers_interference.main(TINY[:6] + ["--batch", "2", "--rounds", "1", "--gap", "0",
                                                 "--engines", *engines, "--out", str(out)])
    labels = [f"{e} f32" for e in engines]
    assert sorted(result["cpu_ms_per_call"]) == sorted(labels) == sorted(result["spin_ms"])
    for label in labels:
        cell = result["cpu_ms_per_call"][label]
        assert min(cell.values()) >= 0 and list(result["spin_ms"][label]) == ["0-50 ms", "50-200 ms", "200-1000 ms"]
    if "onnxruntime" in engines:  # its intra-op pool is created by its build: those threads are its own
        assert "onnxruntime f32" in result["affinity_after_build"]["onnxruntime f32"]
    assert json.loads(out.read_text())["args"]["plan"] == "blocks70"


def test_a_turn_runs_calls_back_to_back_and_times_the_last():
    """--calls-per-turn K: every timed callable (in-process, worker, DeepSparse worker) runs K forwards
    and returns the last one's seconds; the harness asks for K in every turn."""
    durations = iter([0.03, 0.02, 0.01])
    ran = []

    def forward():
        ran.append(1)
        time.sleep(next(durations))
    seconds = peer_engines._timed(forward)(3)
    assert len(ran) == 3 and 0.01 <= seconds < 0.02, seconds

    asked = []
    fake = peer_engines.Prepared(lambda calls=1: asked.append(calls) or 0.5, lambda: None)
    times = peers.time_interleaved({"a": fake}, rounds=2, warmup=1, gap=0, calls=4)
    assert asked == [4, 4, 4] and times == {"a": [0.5, 0.5]}

    class Engine:
        def __init__(self):
            self.runs = 0

        def run(self, inputs, val_inp):
            self.runs += 1
            return [self.runs]
    worker = deepsparse_worker.Worker()
    worker.engine, worker.inputs = Engine(), []
    assert worker.run(calls=5)["seconds"] >= 0 and worker.engine.runs == 5 and worker.last == [5]
    with pytest.raises(SystemExit):
        peers.parse_args(TINY + ["--calls-per-turn", "0"])


def test_rounds_interleave_every_plan_and_engine_of_a_batch(tmp_path):
    """A round gives every plan x engine cell one turn, so the host's slow spells fall on every row
    (the ratios divide rows by the dense row); a cell that fails while timed is reported, the rest go on."""
    calls = []

    class Fake(peer_engines.Engine):
        name, dtypes = "fake", ("f32", "bf16")

        def prepare(self, ctx):
            def call(n=1, tag=ctx.tag, label=self.label):
                calls.append((tag, label))
                if tag.startswith("blocks70") and label == "fake bf16" and len(calls) > 4:  # its second turn
                    raise RuntimeError("boom")
                return 0.001
            return peer_engines.Prepared(call, lambda: ctx.masked(ctx.x).detach().numpy())

    args = peers.parse_args(TINY + ["--rounds", "2", "--warmup", "0", "--gap", "0",
                                    "--plans", "dense", "blocks70"])
    model = peers.build_model("vit_tiny_patch16_224", 32, {"depth": 2})
    x = torch.randn(2, 3, 32, 32)
    rows = peers.run_batch(model, x, [Fake("f32"), Fake("bf16")], args, str(tmp_path), {})
    cells = [("dense.b2", "fake f32"), ("dense.b2", "fake bf16"), ("blocks70.b2", "fake f32"),
             ("blocks70.b2", "fake bf16")]
    assert calls == cells + cells, calls
    by = {(r["plan"], r["label"]): r for r in rows}
    assert by[("dense", "fake f32")]["times_ms"] == [1.0, 1.0]
    assert "boom" in by[("blocks70", "fake bf16")]["skipped"]
    assert by[("blocks70", "fake f32")]["max_rel_err"] < 1e-6
