"""DeepSparse timing worker for bench/peers.py; runs in DeepSparse's own venv (Python <= 3.11, numpy < 2).

DeepSparse cannot share a process with the main venv (it pins numpy < 2 and onnx 1.14), so the
harness starts this script with ``--deepsparse-python`` and talks to it over a pipe, one JSON object
a line. It imports nothing of sparsevit or torch. DeepSparse's licence allows evaluation only: it is
a benchmark reference here, never a dependency.

Requests (stdin) and replies (the original stdout; everything DeepSparse prints goes to stderr):

    {"cmd": "load", "onnx": PATH, "input": NPY, "batch": B, "cores": N}
        -> {"ok": true, "version": ..., "compile_s": ...}
    {"cmd": "run", "calls": K}          -> {"ok": true, "seconds": t}   (K forwards back to back, timed
                                                                         here; t is the last one's)
    {"cmd": "output", "path": NPY}      -> {"ok": true}                 (last output written there)
    {"cmd": "quit"}                     -> the worker exits
Any failure answers {"ok": false, "error": "..."} and the worker keeps serving. bench/peer_worker.py
serves the same protocol with :func:`serve` and :func:`main` (one engine of the main venv per process).
"""
import json
import os
import sys
import time
import traceback

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")


class Worker:
    commands = ("load", "run", "output")

    def __init__(self):
        self.engine = None
        self.inputs = None
        self.last = None

    def load(self, onnx, input, batch, cores):
        import deepsparse
        import numpy as np

        self.inputs = [np.ascontiguousarray(np.load(input), dtype=np.float32)]
        t0 = time.perf_counter()
        self.engine = deepsparse.compile_model(onnx, batch_size=int(batch), num_cores=int(cores))
        return {"version": deepsparse.__version__, "compile_s": time.perf_counter() - t0}

    def run(self, calls=1):
        if self.engine is None:
            raise RuntimeError("run before load")
        for _ in range(int(calls)):
            t0 = time.perf_counter()
            self.last = self.engine.run(self.inputs, val_inp=False)
            seconds = time.perf_counter() - t0
        return {"seconds": seconds}

    def output(self, path):
        import numpy as np

        if self.last is None:
            self.run()
        np.save(path, np.asarray(self.last[0], dtype=np.float32))
        return {}


def serve(requests, reply, worker) -> None:
    """Answer each request line with ``worker``'s method of the same name (one of ``worker.commands``)."""
    for line in requests:
        if not line.strip():
            continue
        req = json.loads(line)
        cmd = req.pop("cmd", None)
        if cmd == "quit":
            return
        try:
            if cmd not in worker.commands:
                raise ValueError(f"unknown command {cmd!r}")
            handler = getattr(worker, cmd)
            answer = {"ok": True, **handler(**req)}
        except Exception as e:  # reported to the harness, which records it as the engine's failure
            traceback.print_exc(file=sys.stderr)
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        reply.write(json.dumps(answer) + "\n")
        reply.flush()


def main(worker=None) -> None:
    # keep the protocol on a private copy of stdout; anything the engine prints (Python or C) lands on stderr
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(sys.stdin, reply, Worker() if worker is None else worker)


if __name__ == "__main__":
    main()
