"""P3B's instruments on a timm model: soft gates, residual-state taps and the auxiliary heads.

Nothing of timm is edited: gates are forward (pre-)hooks on the Linear layers of each branch and are
removed with :meth:`Gates.remove`, after which the model's ``state_dict`` and outputs are what they
were. :func:`read_sites` is the one function that reads timm modules (through the adapter).

Gate placement (all exact with respect to what :func:`sparsevit.masked_model` zeroes):
attn_in: qkv input columns (after norm1); attn_qkv: qkv output rows, one gate per head-dim channel
shared by every head and by q, k and v; attn_out: proj output; mlp_in: fc1 input; mlp_hid: fc2 input
(after the activation); mlp_out: fc2 output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from sparsevit.errors import UnsupportedModelError
from sparsevit.prune.p3b_alloc import ATTN_GATES, MLP_GATES, branch_counts


@dataclass
class BlockSites:
    """What P3B needs of one timm block (read once by :func:`read_sites`)."""

    index: int
    fqn: str
    first_in_stage: bool
    block: nn.Module
    norm1: nn.Module
    norm2: nn.Module
    qkv: nn.Linear
    proj: nn.Linear
    fc1: nn.Linear
    fc2: nn.Linear
    dim: int
    heads: int
    head_dim: int
    hidden: int
    grid: Tuple[int, int]  # patch-token grid of this block's input
    prefix_tokens: int  # class/register tokens before the patch tokens (0 for Swin)

    def gate_sizes(self, branch: str) -> Tuple[int, int, int]:
        if branch == "attn":
            return self.dim, self.head_dim, self.dim
        return self.dim, self.hidden, self.dim

    def count_coefficients(self, branch: str):
        if branch == "attn":
            return branch_counts("attn", self.heads, self.qkv.bias is not None, self.proj.bias is not None)
        return branch_counts("mlp", 1, self.fc1.bias is not None, self.fc2.bias is not None)


def read_sites(model: nn.Module) -> List[BlockSites]:
    """Per block, the modules P3B hooks and the shapes it needs; refuses what it cannot gate exactly."""
    from sparsevit.models import get_adapter

    adapter = get_adapter(model)
    prefix = int(getattr(model, "num_prefix_tokens", 0)) if adapter.family != "swin" else 0
    sites, last_stage = [], -1
    for b in adapter.blocks:
        if b.kind == "beit":
            raise UnsupportedModelError(f"{b.fqn}: P3B gates hook the qkv Linear's forward, which BeiT's attention "
                                        "bypasses (F.linear on its weight); use a ViT/DeiT or Swin model.")
        if not isinstance(getattr(b.mlp, "norm", nn.Identity()), nn.Identity):
            raise UnsupportedModelError(f"{b.fqn}.mlp has a norm between fc1 and fc2; P3B's hidden gate would not "
                                        "be exact there.")
        if adapter.family == "swin":
            grid = tuple(b.block.input_resolution)
        else:
            grid = tuple(model.patch_embed.grid_size)
        sites.append(BlockSites(index=b.index, fqn=b.fqn, first_in_stage=b.stage != last_stage, block=b.block,
                                norm1=b.norm1, norm2=b.norm2, qkv=b.qkv, proj=b.proj, fc1=b.fc1, fc2=b.fc2,
                                dim=b.dim, heads=b.num_heads, head_dim=b.head_dim, hidden=b.hidden,
                                grid=grid, prefix_tokens=prefix))
        last_stage = b.stage
    return sites


def gate_names() -> List[str]:
    return list(ATTN_GATES) + list(MLP_GATES)


class Gates:
    """Soft masks (leaf tensors with gradients, not parameters) hooked onto every block's branches.

    ``masks[i][name]`` is block ``i``'s gate ``name`` (see :data:`ATTN_GATES`, :data:`MLP_GATES`).
    With ``capture=True`` the residual stream before and after every branch is recorded (detached) in
    ``states`` for the Block Performance Indicator.
    """

    def __init__(self, sites: List[BlockSites], device=None):
        self.sites = sites
        self.masks: List[Dict[str, torch.Tensor]] = []
        for s in sites:
            sizes = dict(zip(ATTN_GATES, s.gate_sizes("attn")))
            sizes.update(zip(MLP_GATES, s.gate_sizes("mlp")))
            self.masks.append({k: torch.ones(n, device=device, requires_grad=True) for k, n in sizes.items()})
        self.capture = False
        self.states: Dict[str, torch.Tensor] = {}
        self._handles = []
        for s, m in zip(sites, self.masks):
            self._install(s, m)

    def _install(self, s: BlockSites, m: Dict[str, torch.Tensor]) -> None:
        H = s.heads
        h = self._handles
        h.append(s.qkv.register_forward_pre_hook(lambda mod, a: (a[0] * m["attn_in"],) + tuple(a[1:])))
        h.append(s.qkv.register_forward_hook(lambda mod, a, out: out * m["attn_qkv"].repeat(3 * H)))
        h.append(s.proj.register_forward_hook(lambda mod, a, out: out * m["attn_out"]))
        h.append(s.fc1.register_forward_pre_hook(lambda mod, a: (a[0] * m["mlp_in"],) + tuple(a[1:])))
        h.append(s.fc2.register_forward_pre_hook(lambda mod, a: (a[0] * m["mlp_hid"],) + tuple(a[1:])))
        h.append(s.fc2.register_forward_hook(lambda mod, a, out: out * m["mlp_out"]))
        i = s.index
        if s.first_in_stage:
            h.append(s.norm1.register_forward_pre_hook(lambda mod, a: self._tap(f"A{i}", a[0])))
        h.append(s.norm2.register_forward_pre_hook(lambda mod, a: self._tap(f"M{i}", a[0])))
        h.append(s.block.register_forward_hook(lambda mod, a, out: self._tap(f"O{i}", out)))

    def _tap(self, key: str, x: torch.Tensor) -> None:
        if self.capture:
            self.states[key] = x.detach()

    def remove(self) -> None:
        """Take every hook off; the model is exactly as before the gates were added."""
        for hd in self._handles:
            hd.remove()
        self._handles = []

    def all_masks(self) -> List[torch.Tensor]:
        return [t for m in self.masks for t in m.values()]

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {f"{i}.{k}": t.detach().clone() for i, m in enumerate(self.masks) for k, t in m.items()}

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        for i, m in enumerate(self.masks):
            for k, t in m.items():
                t.copy_(state[f"{i}.{k}"])


def branch_states(sites: List[BlockSites]) -> List[Tuple[str, str]]:
    """(input state, output state) keys of every branch, in order attn0, mlp0, attn1, ..."""
    out = []
    for s in sites:
        i = s.index
        out.append((f"A{i}" if s.first_in_stage else f"O{i - 1}", f"M{i}"))
        out.append((f"M{i}", f"O{i}"))
    return out


class PatchHead(nn.Module):
    """2 x [Conv3x3 + BN + ReLU] over the patch-token grid, then average pooling and a classifier."""

    def __init__(self, dim: int, width: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(dim, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(grid).mean(dim=(2, 3)))


class AuxHeads(nn.Module):
    """Class-token (Linear(D, C)) and patch-token heads on every tapped residual state.

    Swin has no class token: its "class-token" head reads the mean of the tokens.
    """

    def __init__(self, sites: List[BlockSites], num_classes: int, width: Optional[int] = None):
        super().__init__()
        self.layout = {}
        for s in sites:
            keys = ([f"A{s.index}"] if s.first_in_stage else []) + [f"M{s.index}", f"O{s.index}"]
            for k in keys:
                self.layout[k] = (s.dim, s.grid, s.prefix_tokens)
        self.cls = nn.ModuleDict({k: nn.Linear(d, num_classes) for k, (d, _, _) in self.layout.items()})
        self.patch = nn.ModuleDict({k: PatchHead(d, width or d, num_classes) for k, (d, _, _) in self.layout.items()})

    def split(self, key: str, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(class vector [B, D], patch grid [B, D, gh, gw]) of a residual state."""
        dim, (gh, gw), prefix = self.layout[key]
        B = x.shape[0]
        x = x.reshape(B, -1, dim)
        patches = x[:, prefix:]
        if patches.shape[1] != gh * gw:
            raise UnsupportedModelError(f"P3B's patch heads expect {gh}x{gw} patch tokens at state {key}, got "
                                        f"{patches.shape[1]}; train at the model's configured image size.")
        cls = x[:, 0] if prefix > 0 else patches.mean(dim=1)
        return cls, patches.transpose(1, 2).reshape(B, dim, gh, gw)

    def losses(self, states: Dict[str, torch.Tensor], target: torch.Tensor) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Per state: (class-head CE, patch-head CE) on the detached features."""
        out = {}
        for key, x in states.items():
            cls, grid = self.split(key, x)
            out[key] = (F.cross_entropy(self.cls[key](cls), target), F.cross_entropy(self.patch[key](grid), target))
        return out
