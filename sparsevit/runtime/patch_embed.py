"""The patch embedding as a GEMM: a stride == kernel Conv2d is a Linear on the non-overlapping patches.

timm's ViT/DeiT/BeiT patch embedding is ``Conv2d(C, E, p, stride=p)``. Reshaping the image into
``[B * patches, C * p * p]`` and running sparsevit's dense Linear kernels on the ``[E, C * p * p]``
weight computes the same thing; which one is faster (oneDNN's convolution or a dense Linear kernel)
depends on the dtype and batch, so :func:`choose_patch_embed` times them at build time and keeps the
convolution unless a Linear is faster. The module stays an ``nn.Conv2d`` (same parameters, same
state dict), so saving, loading and exporting are unchanged.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from sparsevit.ops.linear_kernels import eager_cpu_call_ok
from sparsevit.runtime.dense_linear import DenseLinear
from sparsevit.runtime.linear import kernel_choice_ms
from sparsevit.runtime.report import LayerDecision, Report

# dense Linear kernels tried against the convolution (names of sparsevit.ops.dense_cpu)
CANDIDATES = ("onednn_packed", "torch_linear", "sparsevit_bsr_full")


class PatchLinearConv(nn.Conv2d):
    """A stride == kernel, unpadded ``nn.Conv2d`` whose forward runs as a dense Linear on the patches.

    ``kernel`` names the :class:`DenseLinear` kernel. The Linear is derived from ``weight`` (never
    saved) and rebuilt after a load or a dtype/device change. Traced forwards, forwards that need
    gradients, under autocast, or inputs whose size is not a multiple of the patch run the
    convolution itself (the same function).
    """

    def __init__(self, conv: nn.Conv2d, kernel: str):
        w = conv.weight
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                         bias=conv.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.weight.copy_(w)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)
        self.kernel = kernel
        self._linear_cache: Optional[DenseLinear] = None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel={self.kernel}"

    def _linear(self) -> Optional[DenseLinear]:
        """The GEMM for the weight as it is now, or None where ``kernel`` cannot run its device/dtype
        (after ``.to(torch.float64)``, say: the convolution then runs)."""
        if self._linear_cache is None:
            w = self.weight.detach()
            lin = DenseLinear(w[0].numel(), w.shape[0], bias=self.bias is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w.reshape(w.shape[0], -1))
                if self.bias is not None:
                    lin.bias.copy_(self.bias)
            if lin.kernel_reasons(self.kernel):
                return None
            lin.set_kernel(self.kernel)
            # a plain attribute, not a submodule: the state dict stays the convolution's
            object.__setattr__(self, "_linear_cache", lin.eval())
        return self._linear_cache

    def _apply(self, fn, *args, **kwargs):
        object.__setattr__(self, "_linear_cache", None)  # rebuilt from the moved/converted weight
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        object.__setattr__(self, "_linear_cache", None)
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.kernel_size
        # eager CPU inference only: traced graphs, exporters and counters see the convolution
        if not eager_cpu_call_ok(x, self.weight, self.bias) or x.dim() != 4 or x.shape[-2] % ph or x.shape[-1] % pw:
            return super().forward(x)
        linear = self._linear()
        if linear is None:
            return super().forward(x)
        B, C, H, W = x.shape
        gh, gw = H // ph, W // pw
        patches = x.view(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B * gh * gw, C * ph * pw)
        # [B, E, gh, gw] as a view of [B, gh, gw, E]: timm's flatten(2).transpose(1, 2) is then free
        return linear(patches).view(B, gh, gw, -1).permute(0, 3, 1, 2)


def _unsupported(conv) -> str:
    if type(conv) is not nn.Conv2d:
        return f"not a plain nn.Conv2d ({type(conv).__name__})"
    if conv.kernel_size != conv.stride or conv.padding != (0, 0) or conv.dilation != (1, 1) or conv.groups != 1:
        return "not a stride == kernel, unpadded, ungrouped convolution"
    if conv.weight.device.type != "cpu" or conv.weight.dtype not in (torch.float32, torch.bfloat16):
        return f"the Linear kernels here are for CPU float32/bfloat16, weights are {conv.weight.device.type} " \
               f"{conv.weight.dtype}"
    return ""


def choose_patch_embed(model: nn.Module, batch_hint: int, report: Report) -> None:
    """Time ``patch_embed.proj`` as a convolution and as each dense Linear kernel on the model's input
    size and ``batch_hint``; swap in :class:`PatchLinearConv` when a Linear is faster. The report says
    which runs, the ms of each option, and why an option (or the whole swap) was not possible."""
    pe = getattr(model, "patch_embed", None)
    conv = getattr(pe, "proj", None)
    size = getattr(pe, "img_size", None)
    if conv is None or size is None:
        return
    why = _unsupported(conv)
    if why:
        report.append(LayerDecision("patch_embed.proj", "kept", "dense", "torch.conv2d", f"convolution kept: {why}"))
        return
    x = torch.randn(batch_hint, conv.in_channels, *size, dtype=conv.weight.dtype)
    options: Dict[str, nn.Module] = {"conv2d": conv}
    failed = []
    for kernel in CANDIDATES:
        try:
            options[kernel] = PatchLinearConv(conv, kernel).eval()
        except Exception as e:  # a kernel that cannot run here is reported, not used
            failed.append(f"{kernel}: {e}")
    with torch.inference_mode():
        ms = kernel_choice_ms({k: (lambda m=m: m(x)) for k, m in options.items()})
    best = min(ms, key=ms.get)
    listing = ", ".join(f"{k} {v:.2f}" for k, v in ms.items())
    reason = f"fastest at batch {batch_hint}: {best} (ms: {listing})" + (f"; not run: {'; '.join(failed)}" if failed else "")
    if best != "conv2d":
        pe.proj = PatchLinearConv(conv, best).eval()
    report.append(LayerDecision("patch_embed.proj", "kept", "dense",
                                "torch.conv2d" if best == "conv2d" else f"patch_gemm:{best}", reason,
                                tuple(conv.weight.shape), tuple(conv.weight.shape), est_ms=ms))


def restore_patch_embed(model: nn.Module, decisions) -> None:
    """Run ``patch_embed.proj`` the way a saved report says it ran (``sparsevit.load``: the file's
    model computes bit for bit what was saved, whatever a new timing would choose)."""
    pe = getattr(model, "patch_embed", None)
    conv = getattr(pe, "proj", None)
    saved = [d for d in decisions if d.get("name") == "patch_embed.proj"]
    if not isinstance(conv, nn.Conv2d):
        return
    kernel = str(saved[-1].get("kernel", "")) if saved else ""  # files from before the choice ran the conv
    plain = conv if type(conv) is nn.Conv2d else nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                                            conv.stride, bias=conv.bias is not None,
                                                            device=conv.weight.device, dtype=conv.weight.dtype)
    if plain is not conv:
        with torch.no_grad():
            plain.weight.copy_(conv.weight)
            if conv.bias is not None:
                plain.bias.copy_(conv.bias)
    if kernel.startswith("patch_gemm:") and not _unsupported(plain):
        pe.proj = PatchLinearConv(plain, kernel.split(":", 1)[1]).eval()
    else:
        pe.proj = plain.eval()
