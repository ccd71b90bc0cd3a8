"""`sparsevit report` and the plan heat map: the values drawn are the plan's kept fractions."""
import os

import pytest
import torch

import sparsevit
from helpers import make_model
from sparsevit import BlockPlan
from sparsevit.cli import main
from sparsevit.visualize import COLUMNS, kept_fractions


def _plan():
    model = make_model("vit_tiny")  # 3 blocks, dim 192, 3 heads of 64, hidden 768
    plan = sparsevit.SparsityPlan.dense(model)
    plan.blocks[0] = BlockPlan(heads=[0, 2], qk_channels=list(range(16)), mlp_channels=list(range(192)),
                               attn_out=list(range(96)))
    plan.blocks[1] = BlockPlan(drop_mlp=True)
    plan.depth = 2
    plan.masks["blocks.1.attn.proj"] = torch.rand(192, 192, generator=torch.Generator().manual_seed(0)) > 0.75
    return model, plan


def test_kept_fractions_follow_the_plan():
    _, plan = _plan()
    rows, labels = kept_fractions(plan)
    col = {c: i for i, c in enumerate(COLUMNS)}
    assert rows[0][col["heads"]] == pytest.approx(2 / 3)
    assert rows[0][col["q/k dim"]] == pytest.approx(16 / 64)
    assert rows[0][col["v dim"]] == 1.0
    assert rows[0][col["MLP"]] == pytest.approx(192 / 768)
    assert rows[0][col["attn out"]] == pytest.approx(0.5)
    assert rows[1][col["MLP"]] == 0.0 and rows[1][col["fc1"]] == 0.0  # dropped branch
    density = float(plan.masks["blocks.1.attn.proj"].float().mean())
    assert rows[1][col["proj"]] == pytest.approx(density) and 0.1 < density < 0.4
    assert all(v == 0.0 for v in rows[2]) and labels[2].endswith("(cut)")
    assert all(v == 1.0 for i, v in enumerate(rows[1]) if COLUMNS[i] not in ("MLP", "MLP in", "MLP out", "fc1",
                                                                          "fc2", "proj"))


def test_report_command_prints_and_draws(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model, plan = _plan()
    plan_path, png = str(tmp_path / "plan.json"), str(tmp_path / "plan.png")
    plan.save(plan_path)
    assert main(["report", plan_path, "--png", png]) == 0
    out = capsys.readouterr().out
    assert "stores no parameter" in out and "heat map" in out
    plan.summary(model)  # stores the statistics in the plan
    plan.save(plan_path)
    assert main(["report", plan_path]) == 0
    assert "total: params" in capsys.readouterr().out
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    fast = sparsevit.accelerate(model, plan)
    model_path = str(tmp_path / "m.sparsevit")
    sparsevit.save(fast, model_path)
    assert main(["report", model_path]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.attn.qkv" in out and "reason" in out
    assert not os.path.exists(str(tmp_path / "missing.png"))
