"""`sparsevit prune` command line."""
import json

import sparsevit
from sparsevit.cli import COMMANDS, main

ARGS = ["--model", "vit_tiny_patch16_224", "--model-kwargs",
        json.dumps({"depth": 2, "embed_dim": 48, "num_heads": 3, "patch_size": 8}), "--img-size", "32",
        "--num-classes", "5", "--quiet"]


def test_prune_writes_plan(tmp_path):
    out = tmp_path / "plan.json"
    rc = main(["prune", *ARGS, "--method", "grouped", "--criterion", "taylor", "--sparsity", "0.5",
               "--data", "digits", "--num-batches", "2", "--prune-residual", "--round-to", "4", "--out", str(out)])
    assert rc == 0
    plan = sparsevit.SparsityPlan.load(out)
    assert plan.meta["criterion"] == "taylor" and plan.meta["stats"]["total"]["prunable_removed"] >= 0.5
    assert plan.residual_channels is not None


def test_prune_unstructured_option(tmp_path):
    out = tmp_path / "plan.json"
    rc = main(["prune", *ARGS, "--method", "magnitude_unstructured", "--criterion", "lamp", "--sparsity", "0.3",
               "--option", "block=[8,8]", "--out", str(out)])
    assert rc == 0 and sparsevit.SparsityPlan.load(out).masks


def test_prune_errors(tmp_path, capsys):
    out = str(tmp_path / "p.json")
    assert main(["prune", *ARGS, "--criterion", "taylor", "--out", out]) == 2
    assert "data" in capsys.readouterr().err
    assert main(["prune", *ARGS, "--criterion", "l1", "--sparsity", "1.0", "--out", out]) == 2
    assert main(["prune", *ARGS, "--method", "nope", "--criterion", "l1", "--out", out]) == 2


def test_subcommand_table_and_listing(capsys):
    assert "prune" in COMMANDS and len(COMMANDS["prune"]) == 3
    assert main(["--list-methods"]) == 0
    assert "grouped" in capsys.readouterr().out


def test_accelerate_bench_export_commands(tmp_path, capsys):
    import torch

    from sparsevit.cli import main

    kw = '{"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}'
    plan = tmp_path / "plan.json"
    assert main(["prune", "--model", "vit_tiny_patch16_224", "--model-kwargs", kw, "--num-classes", "5",
                 "--criterion", "l1", "--sparsity", "0.5", "--out", str(plan), "--quiet"]) == 0
    out = tmp_path / "m.sparsevit"
    assert main(["accelerate", "--model", "vit_tiny_patch16_224", "--model-kwargs", kw, "--num-classes", "5",
                 "--plan", str(plan), "--out", str(out)]) == 0
    assert "accelerated model written" in capsys.readouterr().out
    assert main(["bench", "--model", "vit_tiny_patch16_224", "--model-kwargs", kw, "--num-classes", "5",
                 "--plan", str(plan), "--batch", "2", "--runs", "2", "--warmup", "1"]) == 0
    assert "speed-up" in capsys.readouterr().out
    pt2 = tmp_path / "m.pt2"
    assert main(["export", "--model", str(out), "--out", str(pt2), "--input-size", "1", "3", "32", "32"]) == 0
    program = torch.export.load(str(pt2))
    import sparsevit

    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), sparsevit.load(out)(x), atol=1e-6)
    # a plan for another model is refused with the reason, not a traceback
    assert main(["accelerate", "--model", "vit_tiny_patch16_224", "--model-kwargs",
                 '{"img_size": 32, "patch_size": 8, "depth": 3}', "--plan", str(plan), "--out",
                 str(tmp_path / "x.sparsevit")]) == 2
    assert "plan has 2 blocks but the model has 3" in capsys.readouterr().err
