"""``sparsevit.accelerate``: a timm ViT plus a plan in, a smaller and faster timm-compatible model out."""
from __future__ import annotations

import copy
import time
from typing import Dict, Optional

import torch
from torch import nn

from sparsevit.errors import PlanError, UnsupportedModelError
from sparsevit.models import get_adapter
from sparsevit.models.masking import MaskedLayerNorm
from sparsevit.models.spec import architecture_spec
from sparsevit.plan import SparsityPlan
from sparsevit.runtime.build import LinearFactory, build_block, sliced_layernorm
from sparsevit.runtime.modules import chain_block_norms
from sparsevit.runtime.patch_embed import choose_patch_embed
from sparsevit.runtime.report import LayerDecision, Report
from sparsevit.runtime.threads import PinMode, ThreadPinning, check_mode
from sparsevit.runtime.verify import probe_reference, verify as run_verification

BACKENDS = ("auto", "dense", "sparse", "cpp", "triton", "cuda", "reference", "semi_structured")


def accelerate(model: nn.Module, plan: Optional[SparsityPlan] = None, *, backend: str = "auto",
               dtype: Optional[torch.dtype] = None, inplace: bool = False, batch_hint: int = 8,
               cuda_graph: bool = False, example_input: Optional[torch.Tensor] = None,
               formats: Optional[Dict[str, str]] = None, verify: bool = True,
               pin_threads: PinMode = "auto") -> nn.Module:
    """Return a model that computes what the masked dense model computes, physically smaller.

    Args:
        model: a timm ViT / DeiT / BeiT / Swin (or its masked dense copy).
        plan: what to keep. ``None`` reads the plan from the zeros already in the weights
            (see :meth:`SparsityPlan.from_masked_model`).
        backend: ``"auto"`` picks per layer the fastest correct kernel (dense included); ``"dense"``
            slices structure but keeps every Linear dense; ``"sparse"``/``"cpp"``/``"triton"``/
            ``"cuda"``/``"reference"`` force a sparse implementation where there are zeros left.
        dtype: convert weights to this dtype first (e.g. ``torch.bfloat16``); default: keep.
        inplace: modify ``model`` itself; by default it is left untouched and a copy is returned.
        batch_hint: batch size the kernel choice is tuned for.
        cuda_graph: capture the forward as a CUDA graph for ``example_input``'s shape (CUDA only).
        formats: force the format of some Linears, by fully qualified name (e.g.
            ``{"blocks.0.mlp.fc1": "bsr"}``); the others are chosen per layer.
        verify: after building, run one random probe (batch 1, the model's input size, fixed seed)
            through the masked dense reference (``masked_model(model, plan)``, a temporary copy) and
            the fast model, compare every block's output and the final output within a dtype-aware
            tolerance (fp32 1e-4, bf16/fp16 3e-2 relative), and raise
            :class:`~sparsevit.errors.VerificationError` naming the first block that diverges. The cost
            (seconds) is in ``fast.sparsevit_report.verify_seconds`` (the largest relative error seen in
            ``verify_max_error``).
            ``False`` skips it (``sparsevit.load`` does: its file is checksummed and was compared at save).
        pin_threads: pin torch's intra-op worker threads to one CPU each when the model runs on the CPU, as
            OpenVINO and DeepSparse do (a forward after an idle gap otherwise often finds two threads
            on one CPU): ``"auto"`` pins when the process may run on exactly as many CPUs as there are
            threads, ``True`` whenever there are enough CPUs, ``False`` never. Only torch's worker
            threads are pinned, never the calling thread. ``fast.sparsevit_threads.status`` says what
            was done (see :mod:`sparsevit.runtime.threads`).

    The tile shape the plan's masks were made for (``plan.block``) is the first one the kernel
    choice tries.

    The result is in eval mode, carries ``sparsevit_report`` (one :class:`LayerDecision` per layer:
    what was sliced, which kernel runs, and why) and ``sparsevit_plan``.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"accelerate expects an nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}'; choose one of {BACKENDS}")
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"dtype {dtype} is not supported; use torch.float32, torch.bfloat16 or torch.float16")
    check_mode(pin_threads)
    if plan is not None and not isinstance(plan, SparsityPlan):
        raise PlanError(f"plan must be a SparsityPlan (or None to read zeros), got {type(plan).__name__}")
    get_adapter(model)  # fail fast, before copying, on unsupported models
    source = architecture_spec(model)  # what sparsevit.save rebuilds from; before anything is modified
    fast = model if inplace else copy.deepcopy(model)
    fast.eval()
    if dtype is not None:
        fast.to(dtype)
    adapter = get_adapter(fast)
    if plan is None:
        plan = adapter.infer_plan()
        plan.meta.setdefault("source", "read from zeros")
    adapter.validate_plan(plan)
    residual = adapter.residual_indices(plan)
    _check_masked_norms(adapter, residual)
    # the reference comes from the model as the user gave it, before any block is swapped
    check = _Verification(model if not inplace else fast, plan, adapter, residual) if verify else None

    report = Report()
    make_linear = LinearFactory(report, backend, batch_hint, formats=formats,
                                block_hint=None if plan.block is None else tuple(plan.block),
                                nm_hint=None if plan.nm is None else tuple(plan.nm))
    attention_kernel = _attention_kernel(fast, backend)
    with torch.no_grad():
        new_blocks = [build_block(adapter, b, adapter.resolve(plan, i, residual), plan.masks, make_linear, report,
                                  attention_kernel) for i, b in enumerate(adapter.blocks)]
        for b, nb in zip(adapter.blocks, new_blocks):
            parent, attr = _parent_of(fast, b.fqn)
            parent[int(attr)] = nb
        _slice_outside_blocks(adapter, residual, report)
        chain_block_norms(fast)
        if backend not in ("dense", "reference"):
            choose_patch_embed(fast, batch_hint, report)
    fast.eval()  # again: the swapped-in modules are created in training mode
    fast.sparsevit_report = report
    fast.sparsevit_plan = plan
    fast._sparsevit_accelerated = True
    fast.sparsevit_source, fast.sparsevit_options = source, {"backend": backend, "dtype": dtype and str(dtype)[6:]}
    if check is not None:
        check.run(fast, report)
    fast.sparsevit_threads = ThreadPinning(pin_threads)
    fast.sparsevit_threads.install(fast)
    if cuda_graph:
        from sparsevit.runtime.cuda_graph import capture_cuda_graph

        if example_input is None:
            raise ValueError("cuda_graph=True needs example_input (a tensor of the shape you will run).")
        fast = capture_cuda_graph(fast, example_input)
    return fast


class _Verification:
    """The masked dense reference (a temporary copy) and what comparing against it needs."""

    def __init__(self, model: nn.Module, plan: SparsityPlan, adapter, residual):
        started = time.perf_counter()
        self.reference = probe_reference(model, plan)
        self.build_seconds = time.perf_counter() - started
        self.input_shape = adapter.input_shape()
        self.blocks = [(b.fqn, b.stage) for b in adapter.blocks]
        self.residual = residual

    def run(self, fast: nn.Module, report: Report) -> None:
        try:
            run_verification(self.reference, fast, self.input_shape, self.blocks, self.residual, report,
                             self.build_seconds)
        finally:
            self.reference = None  # free the copy either way


def _attention_kernel(model: nn.Module, backend: str) -> str:
    """``"sparsevit"`` (the fused kernel of the device, Triton on CUDA or C++ on CPU, where it takes
    the input; the report says why not) unless the backend asks for plain torch."""
    p = next(model.parameters())
    if p.device.type not in ("cuda", "cpu") or backend in ("dense", "reference"):
        return "sdpa"
    return "sparsevit"


def _parent_of(model: nn.Module, fqn: str):
    parent_name, _, attr = fqn.rpartition(".")
    return model.get_submodule(parent_name), attr


def _check_masked_norms(adapter, residual) -> None:
    """A masked model's MaskedLayerNorms must agree with the plan's residual channels."""
    for b in adapter.blocks:
        for norm in (b.norm1, b.norm2):
            if isinstance(norm, MaskedLayerNorm):
                keep = norm.keep.cpu()
                R = residual[b.stage]
                if len(keep) != len(R) or not torch.equal(keep.sort().values, R):
                    raise PlanError(f"{b.fqn}: the model's masked norm keeps {len(keep)} residual channels but "
                                    f"the plan keeps {len(R)}; pass plan=None to read the model's own plan.")


def _slice_outside_blocks(adapter, residual, report: Report) -> None:
    """Slice embeddings, norms, patch merging and the head to the kept residual channels."""
    for stage, R in enumerate(residual):
        for entry in adapter.nonblock_coupling(stage):
            _slice_entry(adapter.model, entry, entry.positions(R), report)


def _slice_entry(root: nn.Module, entry, keep: torch.Tensor, report: Report) -> None:
    parent, attr, dim = entry.owner, entry.attr, entry.dim
    t = entry.get()
    if t is None:
        return
    name = _name_of(root, parent, attr)
    if dim is None:
        full = t.normalized_shape[0]
        if len(keep) == full and not isinstance(t, MaskedLayerNorm):
            return
        setattr(parent, attr, sliced_layernorm(t, keep))
        report.append(LayerDecision(name, "sliced", "dense", "torch.layer_norm",
                                    f"residual channels {len(keep)}/{full}", (full,), (len(keep),)))
        return
    if len(keep) == t.shape[dim]:
        return
    before = tuple(t.shape)
    new = nn.Parameter(t.detach().index_select(dim, keep.to(t.device)).clone(), requires_grad=t.requires_grad)
    setattr(parent, attr, new)
    if isinstance(parent, nn.Linear):
        parent.in_features, parent.out_features = parent.weight.shape[1], parent.weight.shape[0]
    if isinstance(parent, nn.Conv2d) and attr == "weight":
        parent.out_channels = new.shape[0]
    report.append(LayerDecision(name, "sliced", "dense", "torch", f"residual channels {len(keep)}",
                                before, tuple(new.shape)))


def _name_of(root: nn.Module, parent: nn.Module, attr: str) -> str:
    for n, m in root.named_modules():
        if m is parent:
            return f"{n}.{attr}" if n else attr
    return attr
