"""Every bad command line ends in ONE line on stderr and a non-zero exit, never a traceback
(subprocess tests: what a user sees)."""
import json
import os
import subprocess
import sys

import pytest

import sparsevit

KW = json.dumps({"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3})
MODEL = ["--model", "vit_tiny_patch16_224", "--model-kwargs", KW, "--num-classes", "5"]


def run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SPARSEVIT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "sparsevit.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


# One child process runs many command lines through `main` (an interpreter start per case would cost
# minutes on CI); each case's stderr is captured apart, and an exception escaping `main` is recorded
# with its traceback, exactly what a user would see.
_MANY = """
import contextlib, io, json, sys, traceback
from sparsevit.cli import main
out = []
for argv in json.load(sys.stdin):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
        except BaseException:
            rc = "raised"
            err.write(traceback.format_exc())
    out.append([rc, err.getvalue()])
print(json.dumps(out))
"""


def run_many(*cases):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SPARSEVIT_DEBUG", None)
    r = subprocess.run([sys.executable, "-c", _MANY], input=json.dumps([[str(a) for a in c] for c in cases]),
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return [subprocess.CompletedProcess(c, rc, "", err) for c, (rc, err) in zip(cases, json.loads(r.stdout))]


def assert_one_line_error(result, *words):
    assert result.returncode not in (0, None, "raised"), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.lstrip().startswith(("warn", "Warn"))]
    assert len(lines) == 1, result.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    plan = d / "plan.json"
    r = run_cli("prune", *MODEL, "--criterion", "l1", "--sparsity", "0.5", "--out", plan, "--quiet")
    assert r.returncode == 0, r.stderr
    model = d / "m.sparsevit"
    r = run_cli("accelerate", *MODEL, "--plan", plan, "--out", model, "--quiet")
    assert r.returncode == 0, r.stderr
    garbage = d / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    return {"dir": d, "plan": plan, "model": model, "garbage": garbage}


def test_every_bad_command_line_is_one_line(files):
    d = files["dir"]
    cases = [
        (("prune", *MODEL, "--criterion", "taylor", "--data", "/nonexistent", "--out", d / "p.json"), "/nonexistent"),
        (("prune", *MODEL, "--criterion", "l1", "--out", d / "missing" / "p.json"), "does not exist"),
        (("prune", "--model", "vit_tiny_patch16_224", "--model-kwargs", "{depth: 2", "--out", d / "p.json"),
         "--model-kwargs"),
        (("prune", "--model", "vit_tiny_patch16_224", "--model-kwargs", '{"dpeth": 2}', "--out", d / "p.json"),
         "dpeth"),
        (("prune", *MODEL, "--criterion", "l1", "--sparsty", "0.5", "--out", d / "p.json"), "--sparsty"),
        # no abbreviations: a truncated option is a typo, not a guess
        (("prune", *MODEL, "--criterion", "l1", "--sparsit", "0.5", "--out", d / "p.json"), "--sparsit"),
        (("accelerate", *MODEL, "--checkpoint", d / "nope.pth", "--out", d / "x.sparsevit"), "no such file"),
        (("accelerate", *MODEL, "--checkpoint", files["garbage"], "--out", d / "x.sparsevit"),
         "not a readable state_dict"),
        (("accelerate", *MODEL, "--backend", "bogus", "--out", d / "x.sparsevit"), "bogus"),
        (("accelerate", *MODEL, "--plan", d, "--out", d / "x.sparsevit"), "directory"),
        (("bench", *MODEL, "--runs", "0"), "--runs"),
        (("bench", *MODEL, "--batch", "0"), "--batch"),
        (("export", "--model", files["model"], "--out", d / "m.pt2", "--input-size", "1", "3", "224", "224"),
         "1 3 32 32"),
        (("export", "--model", files["garbage"], "--out", d / "m.pt2"), "corrupt"),
    ]
    for (argv, word), result in zip(cases, run_many(*(c for c, _ in cases))):
        assert_one_line_error(result, word)


def test_export_goes_through_the_safe_loader(files):
    import torch

    marker = files["dir"] / "pwned"
    evil = files["dir"] / "evil.sparsevit"
    torch.save({"x": _Payload(str(marker))}, evil)
    assert_one_line_error(run_cli("export", "--model", evil, "--out", files["dir"] / "e.pt2"), "trust_pickle")
    assert not marker.exists()
    r = run_cli("export", "--model", files["model"], "--out", files["dir"] / "ok.pt2")
    assert r.returncode == 0, r.stderr
    assert isinstance(sparsevit.load(files["model"]), torch.nn.Module)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))
