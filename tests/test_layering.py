"""Package layering: no import cycles, a plan that is plain data, timm known only to sparsevit.models."""
import ast
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "sparsevit"
# the modules that may import timm: the adapters, and the helpers that construct timm models
TIMM_ALLOWED = ("sparsevit/models/", "sparsevit/data.py", "sparsevit/cli.py", "sparsevit/demo.py")


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if "kernels" in rel.parts:  # Triton kernels import triton at module level
            continue
        yield rel, ".".join(rel.with_suffix("").parts).removesuffix(".__init__")


def _imports(path: pathlib.Path):
    """Every module name an ``import`` statement in ``path`` names, at any depth (lazy ones too)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_plan_imports_nothing_of_models_runtime_or_ops():
    bad = [m for m in _imports(PKG / "plan.py")
           if m.startswith(("sparsevit.models", "sparsevit.runtime", "sparsevit.ops", "sparsevit.prune"))
           or m in ("sparsevit", "timm")]
    assert not bad, f"plan.py must stay plain data, but imports {bad}"


def test_only_models_import_timm():
    offenders = []
    for rel, _ in _modules():
        if str(rel).startswith(TIMM_ALLOWED):
            continue
        offenders += [f"{rel}: {m}" for m in _imports(ROOT / rel) if m.split(".")[0] == "timm"]
    assert not offenders, offenders


def test_prune_and_runtime_do_not_read_timm_layout():
    """The fused-qkv layout and timm's attribute names live in sparsevit/models only: prune/ and
    runtime/ read no such attribute off a module (the sparse modules' own ``self.`` attributes and the
    adapter's ``WindowValues`` aside)."""
    pattern = re.compile(r"(?<!self)(?<!window)\.(q_bias|v_bias|relative_position_index|relative_position_bias_table|"
                         r"dynamic_mask|window_size|shift_size|attn_mask)\b|attn\.scale\b|mlp\.act\b")
    offenders = []
    for folder in ("prune", "runtime"):
        for path in (PKG / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders


def _top_level_edges():
    """module -> sparsevit modules its top-level imports load. The root package (the front door,
    which imports everything) is left out."""
    names = {m for _, m in _modules()}
    edges = {}
    for rel, mod in _modules():
        deps = set()
        for node in ast.parse((ROOT / rel).read_text()).body:
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module
                           for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in names}
        edges[mod] = deps - {"sparsevit", mod}
    return edges


def test_no_import_cycle():
    edges = _top_level_edges()
    done, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            visit(d)
        stack.pop()
        done.add(m)

    for m in sorted(edges):
        visit(m)


def test_every_module_imports_in_a_fresh_interpreter():
    """Every module loads, in a fresh interpreter. Loading any module runs the package's front door
    first, so one interpreter importing them all sees the import orders users can trigger (a
    process per module would cost minutes on CI's 2 cores); ``test_no_import_cycle`` covers the rest."""
    modules = [m for _, m in _modules()]
    script = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script, *modules], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
