"""Torch's intra-op worker threads pinned to one CPU each, for an accelerated model on the CPU.

Why (measured in csrc/cpu/threads.cpp's header): after an idle gap, the OS often wakes torch's
OpenMP workers onto the CPU of the thread that woke them; the two share one CPU and the waiting one
spins through its time slice, so the first forward after a pause (a server between requests) pays
milliseconds. OpenVINO and DeepSparse pin their threads by default; ``accelerate(pin_threads=...)``
does the same for the worker threads sparsevit's kernels run on (threads 1..n-1 of the calling
thread's OpenMP team, which only torch's parallel regions use). The calling thread itself is never
pinned: the user's program keeps its affinity, and pinning the workers alone removed the whole
penalty (a 2-block ViT on 2 CPUs, 50 ms between forwards: 13.7 ms unpinned, 2.3 ms with the workers
pinned, 2.5 ms with the calling thread pinned too; back to back 0.55 ms either way).

- ``"auto"`` (default): pin when the calling thread may run on exactly as many CPUs as torch has
  intra-op threads (a container, ``taskset`` or a machine given to the model). Pinning then takes no
  CPU away from the team; with more CPUs than threads, other processes may have chosen the same CPUs,
  so nothing is pinned.
- ``True``: pin whenever there are at least as many allowed CPUs as threads (one CPU per physical core
  first; the calling thread's share is the first). Two processes that both do this on one machine
  will share the same CPUs.
- ``False``: never.

The workers stay pinned for the life of the process (they are the same threads for every torch op of
the calling thread). What was done is in ``fast.sparsevit_threads.status``.
"""
from __future__ import annotations

import os
import threading
from typing import List, Optional, Tuple, Union

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

PinMode = Union[str, bool]
# per calling thread (its OpenMP team is its own, and ends with it): (threads, mode) -> (cpus, status)
_CALLER = threading.local()


def check_mode(mode: PinMode) -> PinMode:
    if not (mode is True or mode is False or mode == "auto"):
        raise ValueError(f"pin_threads must be 'auto', True or False, got {mode!r}")
    return mode


def _core_of(cpu: int) -> tuple:
    """(package, core) of a CPU from sysfs; the CPU itself where the OS does not say."""
    base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
    try:
        with open(base + "physical_package_id") as f, open(base + "core_id") as g:
            return int(f.read()), int(g.read())
    except (OSError, ValueError):
        return (-1, cpu)


def cores_first(allowed: List[int]) -> List[int]:
    """The allowed CPUs, the first SMT sibling of every physical core before any second sibling."""
    seen, first, later = set(), [], []
    for cpu in sorted(allowed):
        core = _core_of(cpu)
        (later if core in seen else first).append(cpu)
        seen.add(core)
    return first + later


def pinning_for(mode: PinMode, threads: int, allowed: List[int]) -> Tuple[Optional[List[int]], str]:
    """The CPU of each intra-op thread (thread 0 first), or None with the reason nothing is pinned."""
    if mode is False:
        return None, "not pinned: pin_threads=False"
    if threads < 2:
        return None, "not pinned: 1 intra-op thread (nothing can share its CPU)"
    if threads > len(allowed):
        return None, (f"not pinned: {threads} intra-op threads but this thread may run on {len(allowed)} CPUs; "
                      "use torch.set_num_threads to match them")
    if mode == "auto" and threads != len(allowed):
        return None, (f"not pinned: {threads} intra-op threads on {len(allowed)} allowed CPUs (another process "
                      "may use the CPUs we would pick); pass pin_threads=True, or give the process exactly "
                      f"{threads} CPUs (taskset)")
    cpus = cores_first(allowed)[:threads]
    return cpus, (f"pinned ({mode!r}): intra-op workers 1..{threads - 1} on CPUs {cpus[1:]}, the calling "
                  f"thread unpinned (CPU {cpus[0]} is left to it)")


class ThreadPinning:
    """The forward pre-hook of an accelerated model (see the module docstring): pins the calling
    thread's intra-op workers the first time it runs a CPU forward with a given thread count."""

    def __init__(self, mode: PinMode = "auto"):
        self.mode = check_mode(mode)
        self.status = "not pinned: pin_threads=False" if mode is False else \
            "not pinned yet: no CPU forward has run"

    def install(self, model: nn.Module) -> None:
        model.register_forward_pre_hook(self.before)

    def before(self, module: nn.Module, args) -> None:
        x = args[0] if args else None
        # only a plain eager call: a traced / exported / compiled forward must not record the pinning
        if (self.mode is False or type(x) is not torch.Tensor or x.device.type != "cpu"
                or torch.compiler.is_compiling() or torch.jit.is_tracing()
                or _get_current_dispatch_mode() is not None):
            return
        teams = _CALLER.__dict__.setdefault("teams", {})
        key = (torch.get_num_threads(), self.mode)
        team = teams.get(key)
        if team is None:
            team = teams[key] = _pin_team(self.mode, key[0])
        self.status = team[1]


def _pin_team(mode: PinMode, threads: int) -> Tuple[Optional[List[int]], str]:
    if not hasattr(os, "sched_setaffinity"):
        return None, "not pinned: this OS has no thread affinity"
    cpus, status = pinning_for(mode, threads, sorted(os.sched_getaffinity(0)))
    if cpus is not None:
        try:
            torch.ops.sparsevit_C.pin_intraop_workers(cpus[1:])
        except (RuntimeError, AttributeError) as exc:  # AttributeError: the compiled ops are absent
            return None, f"not pinned: {exc}".splitlines()[0]
    return cpus, status
