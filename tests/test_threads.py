"""accelerate(pin_threads=...): when torch's intra-op workers are pinned, to which CPUs, and that
pinning reaches every worker, leaves the calling thread's affinity alone and changes no output.

Pinning is process-wide (the workers serve every torch op of the thread), so the checks that pin run
in a child process. Speed is measured in bench/, never here."""
import os
import subprocess
import sys
import textwrap

import pytest

from sparsevit.runtime import threads

TWO_CPUS = hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2


def test_auto_pins_only_when_the_threads_own_every_allowed_cpu():
    cpus, status = threads.pinning_for("auto", 2, [4, 7])
    assert cpus == [4, 7] and "workers 1..1 on CPUs [7]" in status
    cpus, status = threads.pinning_for("auto", 2, [0, 1, 2, 3])
    assert cpus is None and "pin_threads=True" in status and "taskset" in status
    assert threads.pinning_for(True, 2, [0, 1, 2, 3])[0] == [0, 1]
    for mode, n, allowed, why in (("auto", 1, [0], "1 intra-op thread"), (True, 3, [0, 1], "use torch.set_num_threads"),
                                  (False, 2, [0, 1], "pin_threads=False")):
        cpus, status = threads.pinning_for(mode, n, allowed)
        assert cpus is None and why in status, status


def test_physical_cores_come_before_their_second_siblings(monkeypatch):
    core = {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1), 5: (1, 0)}  # 0/2 and 1/3 are SMT siblings
    monkeypatch.setattr(threads, "_core_of", lambda cpu: core[cpu])
    assert threads.cores_first([3, 2, 1, 0, 5]) == [0, 1, 5, 2, 3]
    assert threads.pinning_for(True, 3, [0, 1, 2, 3, 5])[0] == [0, 1, 5]


def test_pin_threads_is_checked():
    import sparsevit
    from helpers import make_model

    with pytest.raises(ValueError, match="pin_threads must be 'auto', True or False"):
        sparsevit.accelerate(make_model("vit_tiny"), pin_threads="yes")


def _run_child(code: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                         timeout=600, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.skipif(not TWO_CPUS, reason="needs 2 allowed CPUs")
def test_the_op_pins_every_worker_and_not_the_caller():
    _run_child("""
        import os, torch, sparsevit
        torch.set_num_threads(2)
        allowed = os.sched_getaffinity(0)
        worker_cpu = sorted(allowed)[-1]
        out = torch.ops.sparsevit_C.pin_intraop_workers([worker_cpu])
        tids, cpus = out[0::2], out[1::2]
        assert len(set(tids)) == 2 and tids[0] == __import__("threading").get_native_id(), out
        assert cpus == [-1, worker_cpu], out
        assert os.sched_getaffinity(tids[1]) == {worker_cpu}
        assert os.sched_getaffinity(0) == allowed  # the caller keeps its affinity
        try:
            torch.ops.sparsevit_C.pin_intraop_workers([0, 1])
        except RuntimeError as e:
            assert "2 intra-op threads have 1 workers, got 2 CPUs" in str(e), e
        else:
            raise AssertionError("a wrong CPU count was accepted")
    """)


@pytest.mark.skipif(not TWO_CPUS, reason="needs 2 allowed CPUs")
def test_pinned_model_computes_what_the_unpinned_one_does():
    status = _run_child("""
        import os, torch, sparsevit
        from helpers import IMG, make_model
        torch.set_num_threads(2)
        model = make_model("vit_tiny")
        plan = sparsevit.prune(model, method="magnitude_unstructured", criterion="l1", sparsity=0.7)
        x = torch.randn(3, 3, IMG["vit_tiny"], IMG["vit_tiny"])
        free = sparsevit.accelerate(model, plan, pin_threads=False)
        pinned = sparsevit.accelerate(model, plan, pin_threads=True)
        allowed = os.sched_getaffinity(0)
        with torch.inference_mode():
            a, b = free(x), pinned(x)
            ref = sparsevit.masked_model(model, plan).double()(x.double())
        assert torch.equal(a, b)
        assert (b.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
        assert os.sched_getaffinity(0) == allowed
        assert free.sparsevit_threads.status == "not pinned: pin_threads=False"
        print(pinned.sparsevit_threads.status)
    """)
    assert status.startswith("pinned (True): intra-op workers 1..1 on CPUs"), status
