"""The patch embedding run as a GEMM on the patches equals the convolution (float64 reference)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsevit.runtime.patch_embed import CANDIDATES, PatchLinearConv, choose_patch_embed
from sparsevit.runtime.report import Report

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", CANDIDATES)
@pytest.mark.parametrize("cin, cout, p, hw, bias", [(3, 37, 8, (32, 24), True), (5, 100, 4, (12, 20), False)])
def test_patch_gemm_matches_conv(dtype, kernel, cin, cout, p, hw, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, p, stride=p, bias=bias).to(dtype)
    with torch.no_grad():
        conv.weight.normal_()
        if bias:
            conv.bias.normal_()
    x = torch.randn(3, cin, *hw).to(dtype)
    fast = PatchLinearConv(conv, kernel).eval()
    with torch.inference_mode():
        out = fast(x)
    ref = F.conv2d(x.double(), conv.weight.double(), None if not bias else conv.bias.double(), stride=p)
    assert out.shape == ref.shape and out.dtype == dtype
    assert (out.double() - ref).abs().max() <= TOL[dtype] * ref.abs().max()
    assert fast.state_dict().keys() == conv.state_dict().keys()
    # a loaded weight replaces the derived Linear; an input that is not a multiple of the patch runs the conv
    with torch.no_grad():
        fast.load_state_dict({k: v * 2 for k, v in conv.state_dict().items()})
    with torch.inference_mode():
        out2 = fast(x)
        odd = fast(torch.randn(1, cin, hw[0] + 1, hw[1]).to(dtype))
    assert (out2.double() - 2 * ref).abs().max() <= 2 * TOL[dtype] * ref.abs().max()
    assert odd.shape == (1, cout, (hw[0] + 1) // p, hw[1] // p)


def test_choose_reports_and_refuses_what_it_cannot_run():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1).eval()
    report = Report()
    choose_patch_embed(model, 2, report)
    d = [r for r in report if r.name == "patch_embed.proj"][0]
    assert set(d.est_ms) >= {"conv2d", *CANDIDATES} and ("patch_gemm" in d.kernel) == isinstance(
        model.patch_embed.proj, PatchLinearConv)
    model.patch_embed.proj = nn.Conv2d(3, 192, 8, stride=4)
    report = Report()
    choose_patch_embed(model, 2, report)
    assert type(model.patch_embed.proj) is nn.Conv2d and "stride == kernel" in report[0].reason
