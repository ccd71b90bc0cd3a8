"""The per-layer report that ``accelerate`` attaches as ``fast.sparsevit_report``.

Every decision the runtime takes (slice, pack, kernel choice, fallback) leaves one entry here with
the reason, so a user can always tell why a fast kernel was or was not used.
"""
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional


@dataclass
class LayerDecision:
    """What was done to one layer.

    name:    fully qualified name in the *original* model (e.g. ``blocks.3.mlp.fc1``)
    action:  ``sliced`` | ``packed`` | ``dense`` | ``dropped`` | ``kept`` | ``fallback``
    fmt:     weight format, a format string (:mod:`sparsevit.formats`): ``dense``, ``bsr:32x32``, ``2:4``
    kernel:  the implementation that runs: ``torch.linear``, ``cpp_bsr_avx512_bf16``, ``triton_bsr`` ...
    reason:  why this choice (and why faster options were not taken)
    shape_before / shape_after: weight shapes around structural slicing
    density: fraction of weights (after slicing) that the kernel still multiplies
    est_ms:  per-candidate time estimates or measurements behind the choice, when there were any
    """

    name: str
    action: str
    fmt: str = "dense"
    kernel: str = "torch"
    reason: str = ""
    shape_before: Optional[tuple] = None
    shape_after: Optional[tuple] = None
    density: float = 1.0
    est_ms: Dict[str, float] = field(default_factory=dict)

    def as_dict(self):
        return asdict(self)


class Report(list):
    """A list of :class:`LayerDecision` with a readable table."""

    def table(self) -> str:
        rows = [("layer", "action", "format", "kernel", "density", "reason")]
        for d in self:
            rows.append((d.name, d.action, d.fmt, d.kernel, f"{d.density:.2f}", d.reason))
        widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
        lines = []
        for r in rows:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
        return "\n".join(lines)

    def __str__(self):
        return self.table()

    def by_name(self) -> Dict[str, List[LayerDecision]]:
        out: Dict[str, List[LayerDecision]] = {}
        for d in self:
            out.setdefault(d.name, []).append(d)
        return out
