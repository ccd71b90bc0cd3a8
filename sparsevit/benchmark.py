"""Side-by-side latency measurement shared by ``bench/latency.py``, ``sparsevit bench`` and the demo."""
from __future__ import annotations

import statistics
import time
from typing import Dict, List

import torch
from torch import nn


def time_models(models: Dict[str, nn.Module], x: torch.Tensor, warmup: int = 3, runs: int = 10
                ) -> Dict[str, List[float]]:
    """Seconds per forward for each model, measured alternately (so drift and noise from other
    processes hit every model alike), after ``warmup`` untimed rounds, under inference mode."""
    times: Dict[str, List[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for m in models.values():
                m(x)
        for _ in range(runs):
            for k, m in models.items():
                if x.is_cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                m(x)
                if x.is_cuda:
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t0)
    return times


def median_ms(times: List[float]) -> float:
    return 1e3 * statistics.median(times)
