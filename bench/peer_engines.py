"""The engines bench/peers.py times side by side: each turns one (model, plan) into a timed forward.

An :class:`Engine` is one runtime at one precision (``openvino bf16``, ``sparsevit f32`` ...).
``missing()`` says why it cannot run here (package absent, no DeepSparse python given), so the
harness skips it with that reason instead of failing. ``prepare(ctx)`` builds it for one plan and
returns a :class:`Prepared`: ``timed_call()`` runs one forward on the fixed input and returns its
seconds, ``output()`` the logits as float32 for the accuracy check, ``info`` what the engine
reports about itself (version, compile time, the precision it really ran, chosen kernels).

Every engine sees the same weights and masks: torch engines run the masked dense model, ONNX
engines an ONNX export of it (TorchScript exporter, one file per opset, cached in ``ctx``), and
sparsevit ``accelerate(model, plan)``, which computes the same function. ``openvino-sliced`` runs
OpenVINO on the model *after* sparsevit's structural slicing (heads, MLP channels removed; masks
left as zeros): what a user who prunes with sparsevit but serves with OpenVINO would run.
"""
from __future__ import annotations

import collections
import copy
import importlib.util
import json
import os
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
ONNX_OPSET = 17            # LayerNormalization as one op for ONNX Runtime and OpenVINO
DEEPSPARSE_OPSET = 14      # the newest opset DeepSparse 1.8 reads
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepsparse_worker.py")


@dataclass
class PlanContext:
    """What every engine needs for one plan; ONNX exports are made once and shared."""
    model: nn.Module            # the unpruned fp32 model (sparsevit.accelerate takes it with the plan)
    masked: nn.Module           # the masked dense fp32 model (what torch and ONNX engines run)
    plan: object                # sparsevit.SparsityPlan
    x: torch.Tensor             # the fixed fp32 input
    threads: int
    workdir: str
    tag: str                    # plan name, used in file names
    _onnx: Dict[int, str] = field(default_factory=dict)
    _input_npy: Optional[str] = None
    _sliced_onnx: Optional[str] = None

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    def onnx_path(self, opset: int) -> str:
        if opset not in self._onnx:
            path = os.path.join(self.workdir, f"{self.tag}.opset{opset}.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(self.masked, (self.x,), path, dynamo=False, opset_version=opset,
                                  input_names=["x"], output_names=["logits"], do_constant_folding=True)
            self._onnx[opset] = path
        return self._onnx[opset]

    def sliced_onnx_path(self) -> str:
        """ONNX of the structurally sliced model: ``accelerate(backend="dense")`` then
        ``sparsevit.export(format="onnx", densify=True)`` (opset 18)."""
        if self._sliced_onnx is None:
            import sparsevit

            path = os.path.join(self.workdir, f"{self.tag}.sliced.onnx")
            sliced = sparsevit.accelerate(self.model, self.plan, backend="dense", batch_hint=self.batch,
                                          verify=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sparsevit.export(sliced, self.x, path, format="onnx", densify=True)
            self._sliced_onnx = path
        return self._sliced_onnx

    def input_npy(self) -> str:
        if self._input_npy is None:
            self._input_npy = os.path.join(self.workdir, "input.npy")
            np.save(self._input_npy, self.x.numpy())
        return self._input_npy


@dataclass
class Prepared:
    timed_call: Callable[[], float]
    output: Callable[[], torch.Tensor]
    info: Dict = field(default_factory=dict)
    close: Callable[[], None] = lambda: None


def _timed(fn: Callable[[], object]) -> Callable[[], float]:
    def call() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return call


def _as_f32(y) -> torch.Tensor:
    return (y if isinstance(y, torch.Tensor) else torch.from_numpy(np.asarray(y))).detach().float().cpu()


class Engine:
    """One runtime at one precision. Subclasses set ``name`` and implement ``prepare``."""
    name = "?"
    dtypes = ("f32",)
    modules: tuple = ()        # importable modules the engine needs

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


class TorchEager(Engine):
    """timm in PyTorch eager (the masked dense model), under inference mode."""
    name, dtypes = "torch-eager", ("f32", "bf16")

    def prepare(self, ctx):
        model = copy.deepcopy(ctx.masked).to(TORCH_DTYPES[self.dtype]).eval()
        x = ctx.x.to(TORCH_DTYPES[self.dtype])

        def forward():
            with torch.inference_mode():
                return model(x)
        return Prepared(_timed(forward), lambda: _as_f32(forward()), {"torch": torch.__version__})


class TorchCompile(Engine):
    """torch.compile (Inductor) with freezing: weights become constants, folded and pre-packed."""
    name, dtypes = "torch-compile", ("f32", "bf16")
    mode = "default"

    def prepare(self, ctx):
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        model = copy.deepcopy(ctx.masked).to(TORCH_DTYPES[self.dtype]).eval()
        x = ctx.x.to(TORCH_DTYPES[self.dtype])
        compiled = torch.compile(model, mode=self.mode, fullgraph=False, dynamic=False)

        def forward():
            with torch.no_grad():
                return compiled(x)
        t0 = time.perf_counter()
        forward()
        return Prepared(_timed(forward), lambda: _as_f32(forward()),
                        {"torch": torch.__version__, "mode": self.mode, "freezing": True,
                         "compile_s": round(time.perf_counter() - t0, 1)})


class OnnxRuntime(Engine):
    """ONNX Runtime, CPU provider, all graph optimisations, ``threads`` intra-op threads."""
    name, modules = "onnxruntime", ("onnx", "onnxruntime")

    def prepare(self, ctx):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = ctx.threads, 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        t0 = time.perf_counter()
        sess = ort.InferenceSession(ctx.onnx_path(ONNX_OPSET), so, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: ctx.x.numpy()}

        def forward():
            return sess.run(None, feed)[0]
        return Prepared(_timed(forward), lambda: _as_f32(forward()),
                        {"onnxruntime": ort.__version__, "opset": ONNX_OPSET,
                         "load_s": round(time.perf_counter() - t0, 2)})


class OpenVino(Engine):
    """OpenVINO CPU plugin on the ONNX export. Its default precision on CPUs with AVX512_BF16 is bf16,
    so the precision is always set explicitly; ``info`` records what the compiled model reports."""
    name, dtypes, modules = "openvino", ("f32", "bf16"), ("onnx", "openvino")
    sliced = False

    def prepare(self, ctx):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": ctx.threads, "INFERENCE_PRECISION_HINT": self.dtype,
                  "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        t0 = time.perf_counter()
        onnx = ctx.sliced_onnx_path() if self.sliced else ctx.onnx_path(ONNX_OPSET)
        compiled = core.compile_model(core.read_model(onnx), "CPU", config)
        request = compiled.create_infer_request()
        x = ctx.x.numpy()

        def forward():
            request.infer({0: x})
            return request.get_output_tensor(0).data
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        ran = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        return Prepared(_timed(forward), lambda: _as_f32(forward().copy()),
                        {"openvino": ov.__version__, "opset": 18 if self.sliced else ONNX_OPSET, "precision": ran,
                         "load_s": round(time.perf_counter() - t0, 2)})


class OpenVinoSliced(OpenVino):
    """OpenVINO on the structurally sliced model (see the module docstring)."""
    name, sliced = "openvino-sliced", True
    modules = ("onnx", "onnxscript", "openvino")


class DeepSparse(Engine):
    """Neural Magic's DeepSparse 1.8 in its own venv (``--deepsparse-python``), one worker process per
    plan (bench/deepsparse_worker.py). Timed inside the worker, so the pipe is not counted."""
    name = "deepsparse"

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
        log = open(os.path.join(ctx.workdir, f"deepsparse-{ctx.tag}.log"), "w")
        env = dict(os.environ, NM_DISABLE_ANALYTICS="1", PYTHONPATH="")
        proc = subprocess.Popen([self.python, WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=log, text=True, env=env)

        def ask(**req) -> Dict:
            proc.stdin.write(json.dumps(req) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"deepsparse worker died (exit {proc.poll()}); see {log.name}")
            answer = json.loads(line)
            if not answer.pop("ok"):
                raise RuntimeError(f"deepsparse worker: {answer['error']} (log: {log.name})")
            return answer

        def close():
            if proc.poll() is None:
                proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                proc.stdin.close()
                proc.wait(timeout=60)
            log.close()

        try:
            info = ask(cmd="load", onnx=ctx.onnx_path(DEEPSPARSE_OPSET), input=ctx.input_npy(),
                       batch=ctx.batch, cores=ctx.threads)
        except Exception:
            close()
            raise
        out_path = os.path.join(ctx.workdir, f"deepsparse-{ctx.tag}.npy")

        def output():
            ask(cmd="output", path=out_path)
            return _as_f32(np.load(out_path))
        return Prepared(lambda: ask(cmd="run")["seconds"], output,
                        {"deepsparse": info["version"], "opset": DEEPSPARSE_OPSET,
                         "compile_s": round(info["compile_s"], 1)}, close)


class Sparsevit(Engine):
    """``sparsevit.accelerate(model, plan, dtype=...)`` with the default backend (per-layer choice)."""
    name, dtypes = "sparsevit", ("f32", "bf16")

    def prepare(self, ctx):
        import sparsevit

        t0 = time.perf_counter()
        fast = sparsevit.accelerate(ctx.model, ctx.plan, dtype=TORCH_DTYPES[self.dtype], batch_hint=ctx.batch)
        x = ctx.x.to(TORCH_DTYPES[self.dtype])

        def forward():
            with torch.inference_mode():
                return fast(x)
        return Prepared(_timed(forward), lambda: _as_f32(forward()),
                        {"accelerate_s": round(time.perf_counter() - t0, 1), "kernels": kernel_counts(fast)})


def kernel_counts(fast: nn.Module) -> Dict[str, int]:
    """How many layers of the accelerated model run on each kernel (from ``sparsevit_report``)."""
    report = getattr(fast, "sparsevit_report", None) or []
    return dict(collections.Counter(getattr(d, "kernel", "?") for d in report))


ENGINE_TYPES = {cls.name: cls for cls in (TorchEager, TorchCompile, OnnxRuntime, OpenVino, OpenVinoSliced,
                                           DeepSparse, Sparsevit)}


def make_engines(names: List[str], dtypes: List[str], deepsparse_python: Optional[str] = None,
                 compile_mode: str = "default") -> List[Engine]:
    """Every (engine, dtype) pair asked for that the engine can run, in the order given."""
    engines: List[Engine] = []
    for name in names:
        cls = ENGINE_TYPES[name]
        for dt in dtypes:
            if dt not in cls.dtypes:
                continue
            engine = cls(dt, deepsparse_python) if cls is DeepSparse else cls(dt)
            if isinstance(engine, TorchCompile):
                engine.mode = compile_mode
            engines.append(engine)
    return engines
