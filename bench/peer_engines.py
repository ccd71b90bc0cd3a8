"""The engines bench/peers.py times side by side: each turns one (model, plan) into a timed forward.

An :class:`Engine` is one runtime at one precision (``openvino bf16``, ``sparsevit f32`` ...).
``missing()`` says why it cannot run here (package absent, no DeepSparse python given), so the
harness skips it with that reason instead of failing. ``prepare(ctx)`` builds it for one plan and
returns a :class:`Prepared`: ``timed_call()`` runs one forward on the fixed input and returns its
seconds, ``output()`` the logits as a float32 numpy array for the accuracy check, ``info`` what the engine
reports about itself (version, compile time, the precision it really ran, chosen kernels).

Every engine sees the same weights and masks: torch engines run the masked dense model, ONNX
engines an ONNX export of it (TorchScript exporter, one file per opset, cached in ``ctx``), and
sparsevit ``accelerate(model, plan)``, which computes the same function. ``openvino-sliced`` runs
OpenVINO on the model *after* sparsevit's structural slicing (heads, MLP channels removed; masks
left as zeros): what a user who prunes with sparsevit but serves with OpenVINO would run.

Isolation: :class:`Isolated` runs an engine in its own worker process (bench/peer_worker.py, spawned
with the main venv's python, ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = ``--threads``), which imports
only that engine's runtime: torch engines load the model from a safetensors file and the plan from
its JSON file (and sparsevit, which builds the masked model), ONNX engines read the exports the
harness made. One worker per engine lives for the
whole run; it keeps each plan it is asked to load in a slot of its own (the plan's tag) until the
harness unloads it, so all plans of a batch can be timed in the same rounds. Sharing one process let the
engines' thread pools, allocators and CPU pinning act on each other (see bench/PEERS.md).
:class:`WorkerProcess` is the pipe both that worker and DeepSparse's speak (one JSON object a line).
"""
from __future__ import annotations

import collections
import copy
import importlib.util
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import numpy as np

if TYPE_CHECKING:  # torch is imported only by the engines that run on it (an ONNX worker never loads it)
    import torch
    from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ONNX_OPSET = 17            # LayerNormalization as one op for ONNX Runtime and OpenVINO
DEEPSPARSE_OPSET = 14      # the newest opset DeepSparse 1.8 reads
DEEPSPARSE_WORKER = os.path.join(HERE, "deepsparse_worker.py")
PEER_WORKER = os.path.join(HERE, "peer_worker.py")


def torch_dtype(name: str):
    """The torch dtype for ``f32``/``bf16``; torch is imported only by the engines that run on it."""
    import torch

    return {"f32": torch.float32, "bf16": torch.bfloat16}[name]


@dataclass
class PlanContext:
    """What every engine needs for one plan, in the harness; exports and files are made once, shared.
    ``model_spec`` (timm name, kwargs) lets a worker process rebuild the model from ``weights_path()``."""
    model: nn.Module            # the unpruned fp32 model (sparsevit.accelerate takes it with the plan)
    masked: nn.Module           # the masked dense fp32 model (what torch and ONNX engines run)
    plan: object                # sparsevit.SparsityPlan
    x: torch.Tensor             # the fixed fp32 input
    threads: int
    workdir: str
    tag: str                    # plan name and batch, used in file names
    model_spec: Dict = field(default_factory=dict)
    _files: Dict[str, str] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def x_np(self) -> np.ndarray:
        return self.x.numpy()

    def _once(self, key: str, name: str, write: Callable[[str], None]) -> str:
        if key not in self._files:
            path = os.path.join(self.workdir, name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                write(path)
            self._files[key] = path
        return self._files[key]

    def onnx_path(self, opset: int) -> str:
        import torch

        return self._once(f"onnx{opset}", f"{self.tag}.opset{opset}.onnx", lambda path: torch.onnx.export(
            self.masked, (self.x,), path, dynamo=False, opset_version=opset, input_names=["x"],
            output_names=["logits"], do_constant_folding=True))

    def sliced_onnx_path(self) -> str:
        """ONNX of the structurally sliced model: ``accelerate(backend="dense")`` then
        ``sparsevit.export(format="onnx", densify=True)`` (opset 18)."""
        def write(path):
            import sparsevit

            sliced = sparsevit.accelerate(self.model, self.plan, backend="dense", batch_hint=self.batch,
                                          verify=False)
            sparsevit.export(sliced, self.x, path, format="onnx", densify=True)
        return self._once("sliced_onnx", f"{self.tag}.sliced.onnx", write)

    def input_npy(self) -> str:
        return self._once("input", f"{self.tag}.input.npy", lambda path: np.save(path, self.x_np))

    def weights_path(self) -> str:
        """The unpruned model's weights (safetensors), written once per run: the model is the same for
        every plan."""
        path = os.path.join(self.workdir, "model.safetensors")
        if not os.path.exists(path):
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, path)
        return path

    def plan_path(self) -> str:
        return self._once("plan", f"{self.tag}.plan.json", self.plan.save)

    def worker_spec(self, needs: tuple) -> Dict:
        """What a worker process needs to rebuild this context for an engine that ``needs`` these
        files ("model", "onnx17", "onnx14", "sliced_onnx"); everything is written here, in the harness."""
        spec = {"tag": self.tag, "threads": self.threads, "workdir": self.workdir, "input": self.input_npy()}
        for need in needs:
            if need == "model":
                spec.update(model_spec=self.model_spec, weights=self.weights_path(), plan=self.plan_path())
            elif need == "sliced_onnx":
                spec["sliced_onnx"] = self.sliced_onnx_path()
            else:
                spec.setdefault("onnx", {})[need[4:]] = self.onnx_path(int(need[4:]))
        return spec


class WorkerContext:
    """A :class:`PlanContext` rebuilt in a worker process from :meth:`PlanContext.worker_spec`: the same
    attributes, built lazily so an ONNX worker never imports torch."""

    def __init__(self, spec: Dict):
        self.spec, self.tag, self.threads, self.workdir = spec, spec["tag"], spec["threads"], spec["workdir"]
        self.x_np = np.load(spec["input"])
        self.batch = self.x_np.shape[0]
        self._model = self._masked = self._plan = None

    def input_npy(self) -> str:
        return self.spec["input"]

    def onnx_path(self, opset: int) -> str:
        return self.spec["onnx"][str(opset)]

    def sliced_onnx_path(self) -> str:
        return self.spec["sliced_onnx"]

    @property
    def x(self):
        import torch

        return torch.from_numpy(self.x_np)

    @property
    def model(self):
        if self._model is None:
            import timm
            from safetensors.torch import load_file

            ms = self.spec["model_spec"]
            self._model = timm.create_model(ms["name"], pretrained=False, **ms["kwargs"]).eval()
            self._model.load_state_dict(load_file(self.spec["weights"]), strict=True)
        return self._model

    @property
    def plan(self):
        if self._plan is None:
            import sparsevit

            self._plan = sparsevit.SparsityPlan.load(self.spec["plan"])
        return self._plan

    @property
    def masked(self):
        if self._masked is None:
            import sparsevit

            self._masked = sparsevit.masked_model(self.model, self.plan)
        return self._masked


@dataclass
class Prepared:
    timed_call: Callable[..., float]      # timed_call(calls=1): seconds of the last of ``calls`` forwards
    output: Callable[[], np.ndarray]      # float32 logits
    info: Dict = field(default_factory=dict)
    close: Callable[[], None] = lambda: None
    pid: Optional[int] = None             # the worker process that runs it (None: the harness itself)


def _timed(fn: Callable[[], object]) -> Callable[..., float]:
    """``call(calls=1)``: run ``fn`` ``calls`` times back to back, return the last call's seconds."""
    def call(calls: int = 1) -> float:
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            seconds = time.perf_counter() - t0
        return seconds
    return call


def _as_np32(y) -> np.ndarray:
    if hasattr(y, "detach"):  # a torch tensor
        return y.detach().float().cpu().numpy()
    return np.array(y, dtype=np.float32)


class WorkerProcess:
    """A worker process spoken to over a pipe, one JSON object a line (bench/peer_worker.py and
    bench/deepsparse_worker.py share the protocol, see the latter). Its stderr goes to ``log_path``."""

    def __init__(self, argv: List[str], log_path: str, env: Dict[str, str]):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ask(self, **req) -> Dict:
        """Send one request, return the reply; a failure raises RuntimeError with the worker's error."""
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            script = os.path.basename(self.proc.args[1])
            raise RuntimeError(f"worker {script} died (exit {self.proc.wait()}): {self._log_tail()}")
        answer = json.loads(line)
        if not answer.pop("ok"):
            raise RuntimeError(f"worker: {answer['error']}")
        return answer

    def _log_tail(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return " | ".join(f.read().strip().splitlines()[-3:])[-400:]

    def prepared(self, info: Dict, ctx, close: Callable[[], None], slot: Optional[str] = None) -> Prepared:
        """A :class:`Prepared` whose calls are timed inside the worker, so the pipe is not counted;
        ``slot`` names the worker's model to run (bench/peer_worker.py; DeepSparse's worker has one)."""
        where = {} if slot is None else {"slot": slot}
        out_path = os.path.join(ctx.workdir, f"output-{self.pid}-{ctx.tag}.npy")

        def output() -> np.ndarray:
            self.ask(cmd="output", path=out_path, **where)
            return np.load(out_path)
        return Prepared(lambda calls=1: self.ask(cmd="run", calls=calls, **where)["seconds"], output, info,
                        close, pid=self.pid)

    def close(self) -> None:
        if self.alive():
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Engine:
    """One runtime at one precision. Subclasses set ``name`` and implement ``prepare``."""
    name = "?"
    dtypes = ("f32",)
    modules: tuple = ()        # importable modules the engine needs
    needs: tuple = ("model",)  # files a worker process needs (PlanContext.worker_spec)

    def __init__(self, dtype: str = "f32"):
        if dtype not in self.dtypes:
            raise ValueError(f"{self.name} runs {self.dtypes}, not {dtype}")
        self.dtype = dtype

    @property
    def label(self) -> str:
        return f"{self.name} {self.dtype}"

    def missing(self) -> Optional[str]:
        absent = [m for m in self.modules if importlib.util.find_spec(m) is None]
        return f"not installed: {', '.join(absent)} (bash bench/setup_peers.sh)" if absent else None

    def prepare(self, ctx: PlanContext) -> Prepared:
        raise NotImplementedError

    def options(self) -> Dict:
        """Settings a worker process must copy onto its own instance of this engine."""
        return {}

    def shutdown(self) -> None:
        """Release what outlives one plan (a worker process); called once at the end of the run."""


class TorchEager(Engine):
    """timm in PyTorch eager (the masked dense model), under inference mode."""
    name, dtypes = "torch-eager", ("f32", "bf16")

    def prepare(self, ctx):
        import torch

        model = copy.deepcopy(ctx.masked).to(torch_dtype(self.dtype)).eval()
        x = ctx.x.to(torch_dtype(self.dtype))

        def forward():
            with torch.inference_mode():
                return model(x)
        return Prepared(_timed(forward), lambda: _as_np32(forward()), {"torch": torch.__version__})


class TorchCompile(Engine):
    """torch.compile (Inductor) with freezing: weights become constants, folded and pre-packed."""
    name, dtypes = "torch-compile", ("f32", "bf16")
    mode = "default"

    def options(self):
        return {"mode": self.mode}

    def prepare(self, ctx):
        import torch
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        model = copy.deepcopy(ctx.masked).to(torch_dtype(self.dtype)).eval()
        x = ctx.x.to(torch_dtype(self.dtype))
        compiled = torch.compile(model, mode=self.mode, fullgraph=False, dynamic=False)

        def forward():
            with torch.no_grad():
                return compiled(x)
        t0 = time.perf_counter()
        forward()
        return Prepared(_timed(forward), lambda: _as_np32(forward()),
                        {"torch": torch.__version__, "mode": self.mode, "freezing": True,
                         "compile_s": round(time.perf_counter() - t0, 1)})


class OnnxRuntime(Engine):
    """ONNX Runtime, CPU provider, all graph optimisations, ``threads`` intra-op threads."""
    name, modules, needs = "onnxruntime", ("onnx", "onnxruntime"), (f"onnx{ONNX_OPSET}",)

    def prepare(self, ctx):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = ctx.threads, 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        t0 = time.perf_counter()
        sess = ort.InferenceSession(ctx.onnx_path(ONNX_OPSET), so, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: ctx.x_np}

        def forward():
            return sess.run(None, feed)[0]
        return Prepared(_timed(forward), lambda: _as_np32(forward()),
                        {"onnxruntime": ort.__version__, "opset": ONNX_OPSET,
                         "load_s": round(time.perf_counter() - t0, 2)})


class OpenVino(Engine):
    """OpenVINO CPU plugin on the ONNX export. Its default precision on CPUs with AVX512_BF16 is bf16,
    so the precision is always set explicitly; ``info`` records what the compiled model reports."""
    name, dtypes, modules = "openvino", ("f32", "bf16"), ("onnx", "openvino")
    sliced, needs = False, (f"onnx{ONNX_OPSET}",)

    def prepare(self, ctx):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": ctx.threads, "INFERENCE_PRECISION_HINT": self.dtype,
                  "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        t0 = time.perf_counter()
        onnx = ctx.sliced_onnx_path() if self.sliced else ctx.onnx_path(ONNX_OPSET)
        compiled = core.compile_model(core.read_model(onnx), "CPU", config)
        request = compiled.create_infer_request()
        x = ctx.x_np

        def forward():
            request.infer({0: x})
            return request.get_output_tensor(0).data
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        ran = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        return Prepared(_timed(forward), lambda: _as_np32(forward().copy()),
                        {"openvino": ov.__version__, "opset": 18 if self.sliced else ONNX_OPSET, "precision": ran,
                         "load_s": round(time.perf_counter() - t0, 2)})


class OpenVinoSliced(OpenVino):
    """OpenVINO on the structurally sliced model (see the module docstring)."""
    name, sliced, needs = "openvino-sliced", True, ("sliced_onnx",)
    modules = ("onnx", "onnxscript", "openvino")


class DeepSparse(Engine):
    """Neural Magic's DeepSparse 1.8 in its own venv (``--deepsparse-python``), one worker process per
    plan (bench/deepsparse_worker.py, always isolated). Timed inside the worker, so the pipe is not counted."""
    name, needs = "deepsparse", (f"onnx{DEEPSPARSE_OPSET}",)

    def __init__(self, dtype: str = "f32", python: Optional[str] = None):
        super().__init__(dtype)
        self.python = python

    def missing(self):
        if not self.python:
            return "no --deepsparse-python given (bash bench/setup_peers.sh makes one)"
        if not os.path.exists(self.python):
            return f"--deepsparse-python {self.python} does not exist"
        return None

    def prepare(self, ctx):
        log = os.path.join(ctx.workdir, f"deepsparse-{ctx.tag}.log")
        worker = WorkerProcess([self.python, DEEPSPARSE_WORKER], log,
                               dict(os.environ, NM_DISABLE_ANALYTICS="1", PYTHONPATH=""))
        try:
            info = worker.ask(cmd="load", onnx=ctx.onnx_path(DEEPSPARSE_OPSET), input=ctx.input_npy(),
                              batch=ctx.batch, cores=ctx.threads)
        except Exception:
            worker.close()
            raise
        return worker.prepared({"deepsparse": info["version"], "opset": DEEPSPARSE_OPSET,
                                "compile_s": round(info["compile_s"], 1)}, ctx, worker.close)


class Sparsevit(Engine):
    """``sparsevit.accelerate(model, plan, dtype=...)`` with the default backend (per-layer choice)."""
    name, dtypes = "sparsevit", ("f32", "bf16")

    def prepare(self, ctx):
        import torch

        import sparsevit

        t0 = time.perf_counter()
        fast = sparsevit.accelerate(ctx.model, ctx.plan, dtype=torch_dtype(self.dtype), batch_hint=ctx.batch)
        x = ctx.x.to(torch_dtype(self.dtype))

        def forward():
            with torch.inference_mode():
                return fast(x)
        return Prepared(_timed(forward), lambda: _as_np32(forward()),
                        {"accelerate_s": round(time.perf_counter() - t0, 1), "kernels": kernel_counts(fast)})


def kernel_counts(fast) -> Dict[str, int]:
    """How many layers of the accelerated model run on each kernel (from ``sparsevit_report``)."""
    report = getattr(fast, "sparsevit_report", None) or []
    return dict(collections.Counter(getattr(d, "kernel", "?") for d in report))


class Isolated(Engine):
    """``engine`` run in its own worker process (bench/peer_worker.py, the main venv's python), started
    at the first plan and kept for the whole run; each prepare loads its plan there, in the slot named
    by the plan's tag."""

    def __init__(self, engine: Engine):
        self.engine, self.worker = engine, None
        self.name, self.dtypes, self.dtype = engine.name, engine.dtypes, engine.dtype

    def missing(self) -> Optional[str]:
        return self.engine.missing()

    def prepare(self, ctx):
        spec = ctx.worker_spec(self.engine.needs)
        if self.worker is None or not self.worker.alive():
            threads = str(ctx.threads)
            env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
            log = os.path.join(ctx.workdir, f"worker-{self.name}-{self.dtype}.log")
            self.worker = WorkerProcess([sys.executable, PEER_WORKER], log, env)
        worker = self.worker
        answer = worker.ask(cmd="load", slot=ctx.tag, engine=self.name, dtype=self.dtype,
                            options=self.engine.options(), spec=spec)
        info = dict(answer["info"], worker=answer["worker"])
        return worker.prepared(info, ctx, lambda: self._unload(worker, ctx.tag), slot=ctx.tag)

    @staticmethod
    def _unload(worker: WorkerProcess, slot: str) -> None:
        try:
            worker.ask(cmd="unload", slot=slot)
        except RuntimeError:  # its error is recorded already; the next plan starts a fresh worker
            worker.close()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None


ENGINE_TYPES = {cls.name: cls for cls in (TorchEager, TorchCompile, OnnxRuntime, OpenVino, OpenVinoSliced,
                                           DeepSparse, Sparsevit)}


def make_engines(names: List[str], dtypes: List[str], deepsparse_python: Optional[str] = None,
                 compile_mode: str = "default", isolate: bool = False) -> List[Engine]:
    """Every (engine, dtype) pair asked for that the engine can run, in the order given; with
    ``isolate`` each runs in its own worker process (DeepSparse always does)."""
    engines: List[Engine] = []
    for name in names:
        cls = ENGINE_TYPES[name]
        for dt in dtypes:
            if dt not in cls.dtypes:
                continue
            engine = cls(dt, deepsparse_python) if cls is DeepSparse else cls(dt)
            if isinstance(engine, TorchCompile):
                engine.mode = compile_mode
            engines.append(Isolated(engine) if isolate and not isinstance(engine, DeepSparse) else engine)
    return engines
