"""Cost of the fused GELU epilogue on DeiT-S's fc1 under heads_mlp50+blocks70 (384 -> 768, 30% of
32x32 blocks kept, 197 x 8 tokens), one thread: the BSR kernel with act none / GELU erf / GELU tanh,
interleaved rounds, median thread CPU time (indicative on a shared machine). To compare two builds,
run it once per build, alternating, with PYTHONPATH pointing at each copy of the package.

    python bench/gelu_epilogue.py [rounds]
"""
import statistics
import sys
import time

import torch

from sparsevit import _ext  # noqa: F401  (loads the extension)
from sparsevit.formats import BlockSparseWeight

ACT_NAMES = {0: "none", 1: "gelu", 2: "gelu_tanh"}


def fc1_case(dtype, g):
    w = torch.randn(768, 384, generator=g)
    keep = torch.rand(768 // 32, 384 // 32, generator=g) < 0.3
    mask = keep.repeat_interleave(32, 0).repeat_interleave(32, 1)
    ws = BlockSparseWeight.from_dense((w * mask).to(dtype), block=(32, 32))
    return ws, torch.randn(197 * 8, 384, generator=g).to(dtype), torch.randn(768, generator=g).to(dtype)


def main(rounds: int) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        ws, x, b = fc1_case(dtype, g)
        times = {act: [] for act in ACT_NAMES}
        for _ in range(rounds):
            for act in ACT_NAMES:
                t0 = time.thread_time()
                torch.ops.sparsevit_C.bsr_linear(x, ws.packed, ws.col_indices, ws.crow_indices, b, 768, 384, 32, 32,
                                                 act, -1)
                times[act].append(time.thread_time() - t0)
        ms = {act: statistics.median(t[3:]) * 1e3 for act, t in times.items()}
        print(f"{str(dtype)[6:]:>9}: " + " ".join(f"{ACT_NAMES[a]} {v:.3f} ms" for a, v in ms.items())
              + f" | epilogue: gelu +{ms[1] - ms[0]:.3f} ms, gelu_tanh +{ms[2] - ms[0]:.3f} ms")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
