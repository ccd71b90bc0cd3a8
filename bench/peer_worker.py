"""Timing worker for bench/peers.py: one engine of the main venv in its own process.

The harness (``peer_engines.Isolated``) spawns one per engine with ``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS`` set to ``--threads`` and speaks bench/deepsparse_worker.py's protocol to it:

    {"cmd": "load", "slot": S, "engine": NAME, "dtype": "f32", "options": {...}, "spec": {...}}
        -> {"ok": true, "info": {...}, "worker": {"pid", "affinity", "runtimes"}}
    {"cmd": "run", "slot": S, "calls": K}  -> {"ok": true, "seconds": t}   (K forwards back to back,
                                                                          timed here; t the last one's)
    {"cmd": "output", "slot": S, "path": NPY} -> {"ok": true}      (float32 logits written there)
    {"cmd": "unload", "slot": S}           -> {"ok": true}         (that slot's model is dropped)
    {"cmd": "quit"}                        -> the worker exits

A worker holds one built model per slot (the harness uses one slot per plan), so every plan of a
batch stays loaded and the harness can interleave its rounds across plans as well as engines.

``spec`` comes from ``PlanContext.worker_spec``: file paths only (safetensors weights, the plan's
JSON, ONNX exports, the input as .npy); nothing is unpickled. Only the engine's own runtime is
imported: an ONNX Runtime worker never loads torch, so no other runtime's thread pool, allocator or
CPU pinning lives next to the engine being timed. ``worker.runtimes`` in the reply says which were
loaded, ``worker.affinity`` the CPUs the process may run on after the engine was built.
"""
import gc
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import deepsparse_worker  # noqa: E402  (the protocol: serve/main; imports no DeepSparse)
import peer_engines  # noqa: E402

RUNTIMES = ("torch", "sparsevit", "onnxruntime", "openvino")


def _affinity():
    """The CPUs this process may run on (None where the OS does not say)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


class EngineWorker:
    commands = ("load", "run", "output", "unload")

    def __init__(self):
        self.slots = {}  # slot name -> peer_engines.Prepared

    def load(self, engine, dtype, options, spec, slot="0"):
        self.unload(slot)
        eng = peer_engines.ENGINE_TYPES[engine](dtype)
        for key, value in options.items():
            setattr(eng, key, value)
        if "model" in eng.needs:  # a torch engine: its intra-op pool gets --threads like every engine
            import torch

            torch.set_num_threads(int(spec["threads"]))
        self.slots[slot] = eng.prepare(peer_engines.WorkerContext(spec))
        return {"info": self.slots[slot].info,
                "worker": {"pid": os.getpid(), "affinity": _affinity(),
                           "runtimes": [m for m in RUNTIMES if m in sys.modules]}}

    def _loaded(self, slot):
        if slot not in self.slots:
            raise RuntimeError(f"nothing loaded in slot {slot!r} (send load first)")
        return self.slots[slot]

    def run(self, calls=1, slot="0"):
        return {"seconds": self._loaded(slot).timed_call(int(calls))}

    def output(self, path, slot="0"):
        np.save(path, np.asarray(self._loaded(slot).output(), dtype=np.float32))
        return {}

    def unload(self, slot="0"):
        prepared = self.slots.pop(slot, None)
        if prepared is not None:
            prepared.close()
            gc.collect()
        return {}


if __name__ == "__main__":
    deepsparse_worker.main(EngineWorker())
