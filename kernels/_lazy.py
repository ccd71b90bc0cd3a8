"""Lazy ``triton.jit`` / ``triton.autotune`` decoration, one variant per mode.

``triton.jit`` decides between a compiled kernel and the CPU interpreter when it *decorates* a
function (it reads ``TRITON_INTERPRET`` then). Decorating at import time would freeze that choice
for the whole process, so a test that sets the variable after another module imported us would
silently try to compile for a GPU that is not there. We keep the kernel bodies as plain Python
functions (no ``@triton.jit``, and no calls to other jitted helpers, so one body serves both modes)
and decorate them on first use, caching per mode.
"""
import functools


def _interpret() -> bool:
    from . import interpreting

    return interpreting()


@functools.lru_cache(maxsize=None)
def _build(fn, interpret: bool, configs_factory, key):
    import triton

    kernel = triton.jit(fn)
    if configs_factory is not None and not interpret:
        kernel = triton.autotune(configs=configs_factory(), key=list(key))(kernel)
    return kernel


def get_kernel(fn, configs_factory=None, key=()):
    """The jitted ``fn`` for the current mode; autotuned over ``configs_factory()`` when compiled.

    Under the interpreter autotuning is skipped (its timings mean nothing on a CPU), so callers pass
    the meta-parameters themselves in that mode.
    """
    interpret = _interpret()
    return _build(fn, interpret, configs_factory, tuple(key)), interpret


class tl_stub:  # noqa: N801  (stands in for triton.language in annotations when triton is missing)
    constexpr = None
