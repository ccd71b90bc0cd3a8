"""P3B, Pruning by Block Benefit (METHODS.md section 2): a training-time method.

``sparsevit.prune(model, method="p3b", sparsity=0.5, data=loader, epochs=10)`` fine-tunes a copy of
``model`` with soft gates on every attention and MLP branch ("block"), spends the parameter budget
on the blocks that help the auxiliary heads most, and returns a :class:`SparsityPlan` with per-block
read/write residual subsets, head-dim subsets, hidden subsets and dropped branches.

The trained weights: ``sparsevit.prune(..., method="p3b", inplace=True)`` writes them (already
masked by the plan) into ``model`` itself; :func:`p3b_prune` returns a :class:`P3BResult` holding
``plan``, ``model`` (a trained, masked copy; the input is untouched) and the update ``history``.
Either way ``sparsevit.accelerate(trained, plan)`` gives the fast model, equal to
``sparsevit.masked_model(trained, plan)``. ``plan.meta`` holds only plain numbers, never tensors.

Schedule, scaled to short runs (METHODS.md section 2 gives the authors' in epochs): the authors prune
for 50 epochs (benefits from epoch 10, keep ratios ramp to their goal by 25, tau 0.1 -> 0 so masks
are hard by 50, about 3 mask updates per epoch, AdamW 5e-4 cosine), then fine-tune the shrunk model
with a new optimiser. ``epochs`` here is the whole budget: the first ``1 - finetune_fraction`` (0.5)
of its steps is the pruning run in the authors' proportions (0.2 / 0.5 / 1.0 of it), the rest the
fine-tune (fresh AdamW moments, fresh cosine with a 10% warm-up). The final hard decision pools the
last two update intervals, as the authors' finalize step does.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sparsevit.errors import CheckpointError
from sparsevit.plan import BlockPlan, SparsityPlan
from sparsevit.prune.estimators import squared_taylor
from sparsevit.prune.p3b_alloc import (ATTN_GATES, DEFAULT_GATE_FACTORS, MLP_GATES, KeepRatioAllocator,
                                       block_threshold, ramp, ramped_keep_ratio, soft_mask, split_by_gate, tau_at,
                                       unit_ranks)
from sparsevit.prune.p3b_gates import AuxHeads, BlockSites, Gates, branch_states, read_sites
from sparsevit.prune.registry import register_method

CHECKPOINT_VERSION = 2  # 2: pruning phase + fine-tune phase


def _branch_params(coef, kept) -> float:
    """Exact parameters of a branch keeping ``kept = (in, middle, out)`` units; 0 once any is empty."""
    i, m, o = kept
    if i == 0 or m == 0 or o == 0:
        return 0.0
    a1, c1, a2, c2 = coef
    return a1 * m * i + c1 * m + a2 * m * o + c2 * o


class P3BPruner:
    """The mask controller: Taylor^2 gate scores, block benefits, keep ratios and mask updates.

    Blocks are the branches in forward order (attn0, mlp0, attn1, ...). Training code feeds it with
    :meth:`accumulate_scores` and :meth:`accumulate_benefits` and calls :meth:`update` a few times per
    epoch; tests can feed it synthetic numbers directly.
    """

    def __init__(self, sites: List[BlockSites], gates: Gates, sparsity: float, *, gamma: float = 0.2,
                 alpha: float = 0.5, benefit_scale: float = 10.0, softplus_slope: float = 1.4,
                 gate_factors: Optional[Dict[str, float]] = None, max_solve_iter: int = 20):
        self.sites, self.gates = sites, gates
        self.branches = [(s, kind) for s in sites for kind in ("attn", "mlp")]
        self.factors = dict(DEFAULT_GATE_FACTORS if gate_factors is None else gate_factors)
        self.full = torch.tensor([self._count(k, full=True) for k in range(len(self.branches))], dtype=torch.float64)
        self.alloc = KeepRatioAllocator(self.full, (1.0 - sparsity) * float(self.full.sum()), gamma=gamma,
                                        alpha=alpha, scale=benefit_scale, slope=softplus_slope,
                                        max_iter=max_solve_iter)
        self.keep_ratio = torch.ones(len(self.branches), dtype=torch.float64)
        self.reset_accumulators()

    # ------------------------------------------------------------------ bookkeeping
    def names(self, k: int):
        return ATTN_GATES if self.branches[k][1] == "attn" else MLP_GATES

    def masks(self, k: int) -> List[torch.Tensor]:
        site, _ = self.branches[k]
        return [self.gates.masks[site.index][n] for n in self.names(k)]

    def _count(self, k: int, full: bool = False, kept=None) -> float:
        site, kind = self.branches[k]
        if kept is None:
            kept = site.gate_sizes(kind) if full else [int((m > 0.5).sum()) for m in self.masks(k)]
        return _branch_params(site.count_coefficients(kind), kept)

    def remaining(self) -> torch.Tensor:
        return torch.tensor([self._count(k) for k in range(len(self.branches))], dtype=torch.float64)

    def disabled(self) -> List[int]:
        return [k for k in range(len(self.branches)) if self._count(k) == 0]

    def reset_accumulators(self) -> None:
        """Start a new interval; the one just closed is kept for the final, hard update."""
        if hasattr(self, "scores"):
            self.previous = {"scores": self.scores, "score_steps": self.score_steps, "benefit_cls": self.benefit_cls,
                             "benefit_patch": self.benefit_patch, "benefit_steps": self.benefit_steps}
        n = len(self.branches)
        self.scores = [torch.zeros(m.numel(), dtype=torch.float64) for k in range(n) for m in self.masks(k)]
        self.score_steps = 0
        self.benefit_cls = torch.zeros(n, dtype=torch.float64)
        self.benefit_patch = torch.zeros(n, dtype=torch.float64)
        self.benefit_steps = 0

    @torch.no_grad()
    def accumulate_scores(self) -> None:
        """Add (m * dL/dm)^2 of every gate element (after a backward pass) and clear the gate grads.

        The per-batch squared Taylor score of the shared estimators (``estimators.squared_taylor``):
        m * dL/dm is the signed first-order contribution of everything the gate element scales.
        """
        flat = [m for k in range(len(self.branches)) for m in self.masks(k)]
        for acc, m in zip(self.scores, flat):
            if m.grad is not None:
                acc += squared_taylor(m, m.grad)
                m.grad = None
        self.score_steps += 1

    def accumulate_benefits(self, cls: torch.Tensor, patch: torch.Tensor) -> None:
        """Add one step's benefit per block: CE(head(x_in)) - CE(head(x_out)), class and patch heads."""
        self.benefit_cls += cls.detach().double().cpu()
        self.benefit_patch += patch.detach().double().cpu()
        self.benefit_steps += 1

    # ------------------------------------------------------------------ the update
    def update(self, ramp_progress: float, tau: float, final: bool = False) -> Dict:
        """Recompute keep ratios from the mean benefits, then every block's masks; reset the sums.

        ``ramp_progress`` in [0, 1] moves the ratios from 1 to their goal; ``tau`` is the mask
        temperature (0: hard masks; a block with an empty gate is then switched off entirely).
        ``final``: the decision that stays; like the authors, it pools the last two intervals' sums
        (half the noise of one interval, which matters when an interval is a handful of batches).
        """
        if final and getattr(self, "previous", None):
            prev = self.previous
            self.scores = [a + b for a, b in zip(self.scores, prev["scores"])]
            self.score_steps += prev["score_steps"]
            self.benefit_cls, self.benefit_patch = self.benefit_cls + prev["benefit_cls"], self.benefit_patch + prev["benefit_patch"]
            self.benefit_steps += prev["benefit_steps"]
        steps = max(self.benefit_steps, 1)
        goal = self.alloc.update(self.benefit_cls / steps, self.benefit_patch / steps, self.remaining())
        self.keep_ratio = ramped_keep_ratio(goal, ramp_progress)
        per_branch = iter(self.scores)
        for k in range(len(self.branches)):
            scores = [next(per_branch) / max(self.score_steps, 1) for _ in self.names(k)]
            self._update_block(k, scores, float(self.keep_ratio[k]), tau)
        entry = {"keep_ratio": [round(float(v), 6) for v in self.keep_ratio], "goal": [round(float(v), 6) for v in goal],
                 "tau": float(tau), "disabled": self.disabled(),
                 "benefit_cls": [float(v) for v in self.benefit_cls / steps],
                 "benefit_patch": [float(v) for v in self.benefit_patch / steps]}
        self.reset_accumulators()
        return entry

    @torch.no_grad()
    def _update_block(self, k: int, scores: List[torch.Tensor], keep_ratio: float, tau: float) -> None:
        names = self.names(k)
        factors = [self.factors.get(n, 1.0) for n in names]
        sizes = [s.numel() for s in scores]
        pos = unit_ranks(scores, factors)
        t = block_threshold(pos, sizes, lambda kept: self._count(k, kept=kept), keep_ratio * float(self.full[k]))
        new = split_by_gate(soft_mask(pos, t, tau), sizes)
        if tau <= 0 and any(bool((m <= 0.5).all()) for m in new):
            new = [torch.zeros_like(m) for m in new]  # a gate with nothing left switches the whole branch off
        for m, v in zip(self.masks(k), new):
            m.copy_(v.to(m.device))

    def is_hard(self) -> bool:
        return all(bool(((m == 0) | (m == 1)).all()) for k in range(len(self.branches)) for m in self.masks(k))

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> Dict:
        return {"scores": list(self.scores), "score_steps": self.score_steps, "benefit_cls": self.benefit_cls,
                "benefit_patch": self.benefit_patch, "benefit_steps": self.benefit_steps,
                "keep_ratio": self.keep_ratio, "alloc": self.alloc.state_dict(),
                "previous": getattr(self, "previous", None) or {}}

    def load_state_dict(self, state: Dict) -> None:
        self.scores = list(state["scores"])
        self.score_steps, self.benefit_steps = state["score_steps"], state["benefit_steps"]
        self.benefit_cls, self.benefit_patch = state["benefit_cls"], state["benefit_patch"]
        self.keep_ratio = state["keep_ratio"]
        prev = state.get("previous") or None
        self.previous = None if prev is None else dict(prev, scores=list(prev["scores"]))
        self.alloc.load_state_dict(state["alloc"])


def build_plan(model: nn.Module, pruner: P3BPruner) -> SparsityPlan:
    """The plan the (hard) gates describe, in the original model's coordinates."""
    plan = SparsityPlan.dense(model)

    def subset(m: torch.Tensor):
        keep = torch.nonzero(m > 0.5).flatten()
        return None if len(keep) == m.numel() else keep.tolist()

    for site in pruner.sites:
        g = pruner.gates.masks[site.index]
        bp = BlockPlan()
        if any(bool((g[n] <= 0.5).all()) for n in ATTN_GATES):
            bp.drop_attn = True
        else:
            bp.attn_in, bp.attn_out = subset(g["attn_in"]), subset(g["attn_out"])
            bp.qk_channels = bp.v_channels = subset(g["attn_qkv"])
        if any(bool((g[n] <= 0.5).all()) for n in MLP_GATES):
            bp.drop_mlp = True
        else:
            bp.mlp_in, bp.mlp_out = subset(g["mlp_in"]), subset(g["mlp_out"])
            bp.mlp_channels = subset(g["mlp_hid"])
        plan.blocks[site.index] = bp
    return plan


@dataclass
class P3BResult:
    """What :func:`p3b_prune` returns: the plan, the trained masked model and the mask-update log."""

    plan: SparsityPlan
    model: nn.Module
    history: List[Dict] = field(default_factory=list)


@dataclass
class _Schedule:
    """Step counts of one P3B run: a pruning phase of ``prune`` steps, then ``total - prune`` steps of
    hard-mask fine-tuning. Inside the pruning phase: benefits from ``start``, keep ratios ramp to their
    goal by ``ramp_end``, masks are hard from ``final`` on; masks update every ``interval`` steps."""

    total: int
    prune: int
    start: int
    ramp_end: int
    final: int
    interval: int

    @classmethod
    def make(cls, epochs: int, steps_per_epoch: int, warmup: float, ramp_end: float, sharpen_end: float,
             updates_per_epoch: float, finetune_fraction: float = 0.0) -> "_Schedule":
        if not 0 <= warmup <= ramp_end <= sharpen_end <= 1:
            raise ValueError(f"need 0 <= warmup ({warmup}) <= ramp_end ({ramp_end}) <= sharpen_end ({sharpen_end}) "
                             "<= 1 (fractions of the pruning phase)")
        if not 0 <= finetune_fraction < 1:
            raise ValueError(f"finetune_fraction={finetune_fraction} must be in [0, 1) (the share of the run spent "
                             "fine-tuning the hard-masked model)")
        total = epochs * steps_per_epoch
        prune = min(max(int(round((1 - finetune_fraction) * total)), 1), total)
        interval = max(1, int(round(steps_per_epoch / max(updates_per_epoch, 1e-9))))
        start = min(int(round(warmup * prune)), prune - 1)
        final = max(min(int(round(sharpen_end * prune)), prune), start + 1)
        ramp_at = min(max(int(round(ramp_end * prune)), start), final)
        return cls(total, prune, start, ramp_at, final, interval)

    def is_update(self, step: int) -> bool:
        """After optimiser step ``step`` (1-based count): a few times per epoch, and at ``final``."""
        return self.start < step <= self.final and ((step - self.start) % self.interval == 0 or step == self.final)

    def lr_factor(self, step: int, floor: float, finetune_warmup: float) -> float:
        """Cosine from 1 to ``floor`` over the pruning phase, then a fresh schedule for the fine-tune
        phase (linear warm-up over ``finetune_warmup`` of it, cosine to ``floor``): the authors run the
        fine-tune of the pruned model as a separate training run."""
        def cosine(s: int, n: int) -> float:
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s / max(n, 1), 1.0)))

        if step < self.prune:
            return cosine(step, self.prune)
        s, n = step - self.prune, self.total - self.prune
        warm = int(round(finetune_warmup * n))
        if s < warm:
            return (s + 1) / (warm + 1)
        return cosine(s - warm, n - warm)


def _batches(data: Iterable):
    for batch in data:
        if isinstance(batch, dict):
            yield batch.get("image", batch.get("pixel_values")), batch.get("label", batch.get("labels"))
        else:
            yield batch[0], batch[1]


def _default_loss(out, y):
    if isinstance(out, (tuple, list)):
        out = out[0]
    return F.cross_entropy(out, y)


def p3b_prune(model: nn.Module, sparsity: float, data: Iterable, *, epochs: int = 10, lr: float = 5e-4,
              weight_decay: float = 0.05, min_lr: float = 1e-6, finetune_fraction: float = 0.5,
              finetune_warmup: float = 0.1, warmup: float = 0.2, ramp_end: float = 0.5, sharpen_end: float = 1.0,
              updates_per_epoch: float = 3, gamma: float = 0.2, alpha: float = 0.5,
              tau_max: float = 0.1, tau_min: float = 0.0, benefit_scale: float = 10.0,
              softplus_slope: float = 1.4, gate_factors: Optional[Dict[str, float]] = None,
              max_solve_iter: int = 20, patch_head_width: Optional[int] = None, grad_clip: Optional[float] = 1.0,
              loss_fn: Optional[Callable] = None, device=None, resume: Optional[str] = None,
              progress: bool = True, seed: int = 0) -> P3BResult:
    """Run P3B on a copy of ``model`` (pruning phase, then hard-mask fine-tune); return plan, trained
    masked model, history.

    The authors prune in one run (50 epochs: warm-up to epoch 10, keep ratios at their goal by 25,
    hard masks by 50, cosine lr over the run) and then fine-tune the shrunk model in a separate run with
    a fresh schedule. Here ``epochs`` is the whole budget and keeps that shape: ``finetune_fraction``
    of its steps is the fine-tune (a fresh cosine, ``finetune_warmup`` of it a linear warm-up), the rest
    is the pruning phase, and ``warmup`` / ``ramp_end`` / ``sharpen_end`` are fractions of the pruning
    phase (the authors' 10/50, 25/50, 50/50). Why 0.5: with 10 epochs, masks that turn hard at 80% of
    one cosine run (the earlier scaling) left 2 epochs at a near-zero lr to recover from the soft ->
    hard step, and at 75% sparsity that cost several points; one-shot methods get the whole budget as
    hard-mask fine-tuning. ``finetune_fraction=0, sharpen_end=1`` is the authors' pruning run alone.

    Args (authors' defaults, schedule scaled as above):
        sparsity: fraction of the block (prunable) parameters to remove, in [0, 1).
        data: (images, labels) batches with ``len()``, re-iterated every epoch.
        epochs: length of the whole run (pruning phase + fine-tune).
        updates_per_epoch: mask updates per epoch (authors: about 3).
        lr, weight_decay, min_lr: AdamW, cosine per phase (authors: 5e-4, 0.05).
        gamma: EMA weight of new block importances (0.2); alpha: class vs patch blend (0.5);
        benefit_scale, softplus_slope: the soft clip f(x) = softplus(1.4x) - softplus(1.4x - 10), x = 10 b / max b.
        tau_max -> tau_min: mask temperature annealed from 0.1 to 0 (hard) between ``ramp_end`` and
            ``sharpen_end``; gate_factors: rank multipliers per gate (attn_out 1.5, mlp_hid 0.75,
            mlp_out 1.5); max_solve_iter: clamped re-solves of the keep ratios (20).
        patch_head_width: channels of the patch-token heads' convolutions (default: the block width).
        resume: checkpoint file; loaded when it exists (state dicts only, ``weights_only=True``) and
            rewritten atomically after every epoch (both phases).
    """
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1)")
    try:
        steps_per_epoch = len(data)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError("P3B needs data with len() (a DataLoader or a list of batches).") from None
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"P3B needs at least one epoch of at least one batch (epochs={epochs}, "
                         f"batches={steps_per_epoch}).")
    torch.manual_seed(seed)
    work = copy.deepcopy(model)
    if device is not None:
        work.to(device)
    dev = next(work.parameters()).device
    sites = read_sites(work)
    gates = Gates(sites, device=dev)
    heads = AuxHeads(sites, int(model.num_classes), patch_head_width).to(dev)
    pruner = P3BPruner(sites, gates, float(sparsity), gamma=gamma, alpha=alpha, benefit_scale=benefit_scale,
                       softplus_slope=softplus_slope, gate_factors=gate_factors, max_solve_iter=max_solve_iter)
    sched = _Schedule.make(epochs, steps_per_epoch, warmup, ramp_end, sharpen_end, updates_per_epoch,
                           finetune_fraction)
    opt = torch.optim.AdamW(list(work.parameters()) + list(heads.parameters()), lr=lr, weight_decay=weight_decay)
    floor = min_lr / lr if lr > 0 else 0.0
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: sched.lr_factor(s, floor, finetune_warmup))
    trainer = _Trainer(work, heads, gates, pruner, sched, opt, lr_sched, loss_fn or _default_loss, grad_clip,
                       dict(tau_max=tau_max, tau_min=tau_min))
    config = {"sparsity": float(sparsity), "epochs": int(epochs), "steps_per_epoch": int(steps_per_epoch),
              "pruning_steps": sched.prune}
    start_epoch = trainer.load(resume, config) if resume and os.path.exists(resume) else 0
    try:
        trainer.run(data, start_epoch, epochs, resume, config, progress)
        if not pruner.is_hard():
            trainer.history.append(pruner.update(1.0, 0.0, final=True))
        plan = build_plan(model, pruner)
    finally:
        gates.remove()
    from sparsevit.models import get_adapter, masked_model

    trained = masked_model(work, plan, inplace=True).eval()
    plan.meta = {"method": "p3b", "criterion": "taylor", "sparsity": float(sparsity), "epochs": int(epochs),
                 "pruning_steps": sched.prune, "finetune_steps": sched.total - sched.prune,
                 "keep_ratio": [float(v) for v in pruner.keep_ratio], "disabled_blocks": pruner.disabled(),
                 "updates": len(trainer.history), "stats": get_adapter(model).count(plan)}
    return P3BResult(plan, trained, trainer.history)


class _Trainer:
    """The pruning fine-tune: one optimiser over the model and the auxiliary heads."""

    def __init__(self, work, heads, gates, pruner, sched, opt, lr_sched, loss_fn, grad_clip, tau):
        self.work, self.heads, self.gates, self.pruner = work, heads, gates, pruner
        self.sched, self.opt, self.lr_sched, self.loss_fn = sched, opt, lr_sched, loss_fn
        self.grad_clip, self.tau = grad_clip, tau
        self.states = branch_states(pruner.sites)
        self.step, self.history = 0, []

    def run(self, data, start_epoch, epochs, resume, config, progress) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=self.sched.total, initial=self.step, desc="p3b", disable=None if progress else True,
                   leave=False)
        self.work.train()
        self.heads.train()
        for epoch in range(start_epoch, epochs):
            for x, y in _batches(data):
                loss = self.train_step(x, y)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", pruned=len(self.pruner.disabled()))
            if resume:
                self.save(resume, epoch + 1, config)
        self.gates.capture = False
        self.gates.states.clear()
        bar.close()

    def train_step(self, x, y) -> float:
        if self.step >= self.sched.prune:
            return self.finetune_step(x, y)
        self.gates.capture = True
        dev = next(self.work.parameters()).device
        x, y = x.to(dev), y.to(dev)
        loss = self.loss_fn(self.work(x), y)
        aux = self.heads.losses(self.gates.states, y)
        total = loss + sum(c + p for c, p in aux.values())
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.pruner.accumulate_scores()
        if self.step >= self.sched.start:
            cls = torch.stack([aux[i][0] - aux[o][0] for i, o in self.states])
            patch = torch.stack([aux[i][1] - aux[o][1] for i, o in self.states])
            self.pruner.accumulate_benefits(cls, patch)
        self._optimiser_step()
        if self.sched.is_update(self.step):
            s = self.sched
            tau = tau_at(ramp(self.step, s.ramp_end, s.final), self.tau["tau_max"], self.tau["tau_min"])
            final = self.step >= s.final
            entry = self.pruner.update(ramp(self.step, s.start, s.ramp_end), 0.0 if final else tau, final=final)
            entry["step"] = self.step
            self.history.append(entry)
        return float(loss.detach())

    def finetune_step(self, x, y) -> float:
        """The fine-tune phase: masks are hard and fixed; no auxiliary heads, no scores. Its first step
        starts from fresh AdamW moments, as the authors build a new optimiser for the pruned model."""
        if self.step == self.sched.prune:
            self.opt.state.clear()
        self.gates.capture = False
        self.gates.states.clear()
        dev = next(self.work.parameters()).device
        loss = self.loss_fn(self.work(x.to(dev)), y.to(dev))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        for m in self.gates.all_masks():
            m.grad = None
        self._optimiser_step()
        return float(loss.detach())

    def _optimiser_step(self) -> None:
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.work.parameters(), self.grad_clip)
        self.opt.step()
        self.lr_sched.step()
        self.step += 1

    def save(self, path: str, epoch: int, config: Dict) -> None:
        from sparsevit._io import atomic_write

        state = {"version": CHECKPOINT_VERSION, "config": config, "epoch": epoch, "step": self.step,
                 "model": self.work.state_dict(), "heads": self.heads.state_dict(),
                 "opt": self.opt.state_dict(), "lr_sched": self.lr_sched.state_dict(),
                 "gates": self.gates.state_dict(), "pruner": self.pruner.state_dict(), "history": self.history}
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: torch's zip writer rejects some temp-file names
                torch.save(state, f)

        atomic_write(path, write)

    def load(self, path: str, config: Dict) -> int:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot resume from {path}: {exc}. Delete it to start afresh.") from None
        if state.get("version") != CHECKPOINT_VERSION or state.get("config") != config:
            raise CheckpointError(f"{path} is a P3B checkpoint of another run ({state.get('config')} != {config}); "
                                  "delete it or pass another resume= path.")
        self.work.load_state_dict(state["model"])
        self.heads.load_state_dict(state["heads"])
        self.opt.load_state_dict(state["opt"])
        self.lr_sched.load_state_dict(state["lr_sched"])
        self.gates.load_state_dict(state["gates"])
        self.pruner.load_state_dict(state["pruner"])
        self.step, self.history = int(state["step"]), list(state["history"])
        return int(state["epoch"])


@register_method("p3b", criteria=("taylor",), needs_data=True)
def p3b_method(model, *, criterion="taylor", sparsity=0.5, data=None, num_batches=None, loss_fn=None,
               inplace: bool = False, **options) -> SparsityPlan:
    """P3B (block benefit; soft gates, keep ratios per block, reactivation): a training-time method.

    Options are those of :func:`p3b_prune` (``epochs``, ``lr``, ``resume``, ...). P3B trains on every
    batch of ``data`` for ``epochs`` (``num_batches`` does not apply). ``inplace=True`` writes the
    trained, masked weights into ``model``; otherwise ``model`` is untouched and only the plan is
    returned (call :func:`p3b_prune` to get the trained copy as well).
    """
    if sparsity is None:
        raise ValueError("P3B needs sparsity= (the fraction of block parameters to remove).")
    result = p3b_prune(model, sparsity, data, loss_fn=loss_fn, **options)
    if inplace:
        with torch.no_grad():
            model.load_state_dict(result.model.state_dict())
    return result.plan
