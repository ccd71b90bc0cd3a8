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
