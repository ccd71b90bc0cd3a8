"""Command line: ``sparsevit prune|accelerate|bench|export ...``.

Subcommands live in :data:`COMMANDS` as ``name -> (help, add_arguments(parser), run(args) -> int)``;
:func:`register_command` adds one (``accelerate``, ``bench``, ``export`` are added the same way).

    sparsevit prune --model vit_tiny_patch16_224 --model-kwargs '{"img_size": 32, "patch_size": 8}' \\
        --method grouped --criterion taylor --sparsity 0.5 --data digits --out plan.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

COMMANDS: Dict[str, Tuple[str, Callable, Callable]] = {}


def register_command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                     run: Callable[[argparse.Namespace], int]) -> None:
    """Add subcommand ``name``: ``add_arguments(parser)`` declares its options, ``run(args)`` returns an
    exit code."""
    COMMANDS[name] = (help, add_arguments, run)


# ----------------------------------------------------------------------------------- shared helpers
def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="timm model name (created with pretrained=False)")
    p.add_argument("--model-kwargs", default="{}", help="JSON dict passed to timm.create_model "
                   "(e.g. '{\"depth\": 4, \"embed_dim\": 96}')")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (passed to timm as img_size)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size")
    p.add_argument("--checkpoint", default=None, help="state_dict (.pth/.pt/.safetensors) to load")


def load_model(args: argparse.Namespace):
    """The timm model the arguments describe (pretrained=False, optional checkpoint), in eval mode."""
    import timm
    import torch

    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--model-kwargs is not valid JSON ({exc}); e.g. '{{\"depth\": 4}}'") from None
    if not isinstance(kwargs, dict):
        raise ValueError("--model-kwargs must be a JSON object, e.g. '{\"depth\": 4}'")
    if args.img_size is not None:
        kwargs.setdefault("img_size", args.img_size)
    if args.num_classes is not None:
        kwargs.setdefault("num_classes", args.num_classes)
    try:
        model = timm.create_model(args.model, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as exc:  # unknown name or bad kwargs
        raise ValueError(f"timm cannot create '{args.model}' with --model-kwargs {kwargs}: {exc}") from None
    if args.checkpoint:
        state = _read_checkpoint(args.checkpoint)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise ValueError(f"--checkpoint {args.checkpoint} does not fit {args.model}: {exc}") from None
        if missing or unexpected:
            print(f"warning: checkpoint: {len(missing)} missing, {len(unexpected)} unexpected keys "
                  f"(e.g. {(missing or unexpected)[:3]})", file=sys.stderr)
    return model.eval()


def _read_checkpoint(path: str) -> dict:
    """A state_dict from a .safetensors or torch file (weights only: nothing in it is executed)."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--checkpoint {path}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"--checkpoint {path} is not a readable state_dict ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    elif isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"--checkpoint {path} holds a {type(state).__name__}, not a state_dict")
    return state


def _check_out(path: str) -> str:
    """Fail before any work when ``--out`` cannot be written (missing folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--out {path}: folder {folder} does not exist; create it first")
    if os.path.isdir(path):
        raise IsADirectoryError(f"--out {path} is a directory; give a file name")
    return path


def _positive(name: str):
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {v!r}") from None
        if n <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {n}")
        return n
    return parse


def model_img_size(model, default: int = 224) -> int:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if isinstance(size, (tuple, list)):
        return int(size[0])
    return int(size) if size else default


def make_data(args: argparse.Namespace, model):
    """Training loader for ``--data`` (``digits`` or an ImageFolder path), or None."""
    if not args.data:
        return None
    img = args.img_size or model_img_size(model)
    if args.data == "digits":
        from sparsevit.data import digits_loaders

        n = args.num_classes or getattr(model, "num_classes", 10) or 10
        return digits_loaders(classes=range(min(int(n), 10)), img_size=img, batch_size=args.batch_size)[0]
    from sparsevit.data import image_folder_loaders

    if not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data {args.data}: no such folder (use 'digits' or an ImageFolder path)")
    return image_folder_loaders(args.data, img_size=img, batch_size=args.batch_size)[0]


def _parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


# ----------------------------------------------------------------------------------- prune
def _prune_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--method", default="grouped", help="pruning method (see --list-methods)")
    p.add_argument("--criterion", default="taylor", help="l1 | l2 | taylor | hessian | random | lamp")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of prunable parameters to remove")
    p.add_argument("--macs", type=float, default=None, help="fraction of MACs to remove instead (grouped)")
    p.add_argument("--data", default=None, help="'digits' (bundled, no download) or an ImageFolder path; "
                   "needed by taylor/hessian")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-batches", type=int, default=8, help="batches used for gradient criteria")
    p.add_argument("--prune-residual", action="store_true", help="also prune embedding (residual) channels")
    p.add_argument("--prune-head-dims", action="store_true", help="also prune head-dim channels")
    p.add_argument("--no-prune-heads", action="store_true")
    p.add_argument("--no-prune-mlp", action="store_true")
    p.add_argument("--round-to", type=int, default=1, help="kept channel counts become multiples of this")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra method option (JSON value), repeatable, e.g. --option block=[32,32]")
    p.add_argument("--out", required=True, help="where to write the plan (JSON)")
    p.add_argument("--quiet", action="store_true")


def _prune_run(args: argparse.Namespace) -> int:
    import sparsevit.prune as P

    _check_out(args.out)
    model = load_model(args)
    data = make_data(args, model)
    opts = {}
    if args.method.lower() in ("grouped", "depgraph", "structured"):
        opts = dict(prune_residual=args.prune_residual, prune_head_dims=args.prune_head_dims,
                    prune_heads=not args.no_prune_heads, prune_mlp=not args.no_prune_mlp, round_to=args.round_to,
                    progress=not args.quiet)
        if args.macs is not None:
            opts["macs"] = args.macs
    for kv in args.option:
        if "=" not in kv:
            raise ValueError(f"--option expects KEY=VALUE, got '{kv}'")
        k, v = kv.split("=", 1)
        opts[k.strip()] = _parse_value(v)
    try:
        plan = P.prune(model, method=args.method, criterion=args.criterion, sparsity=args.sparsity, data=data,
                       num_batches=args.num_batches, **opts)
    except TypeError as exc:  # an option the method does not take
        raise ValueError(f"{exc} (check the --option names)") from None
    plan.meta.setdefault("model", args.model)
    plan.save(args.out)
    if not args.quiet:
        print(plan.summary())
        print(f"plan written to {args.out}")
    return 0


register_command("prune", "score a timm model and write a SparsityPlan", _prune_arguments, _prune_run)


# ----------------------------------------------------------------------------------- accelerate
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
BACKENDS = ("auto", "dense", "sparse", "cpp", "triton", "cuda", "reference", "semi_structured")


def _accelerate_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--plan", default=None, help="plan JSON (default: read the plan from the checkpoint's zeros)")
    p.add_argument("--backend", default="auto", choices=list(BACKENDS), help="kernel choice (auto picks per layer)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="convert weights first")
    p.add_argument("--batch-hint", type=int, default=8, help="batch size the kernel choice is tuned for")
    p.add_argument("--out", required=True, help="where to write the accelerated model (.sparsevit)")
    p.add_argument("--quiet", action="store_true")


def _accelerate_run(args: argparse.Namespace) -> int:
    import torch

    import sparsevit

    _check_out(args.out)
    model = load_model(args)
    plan = sparsevit.SparsityPlan.load(args.plan) if args.plan else None
    dtype = getattr(torch, args.dtype) if args.dtype else None
    fast = sparsevit.accelerate(model, plan, backend=args.backend, dtype=dtype, batch_hint=args.batch_hint)
    sparsevit.save(fast, args.out)
    if not args.quiet:
        print(fast.sparsevit_report.table())
        print(fast.sparsevit_plan.summary(model))
        print(f"accelerated model written to {args.out}")
    return 0


register_command("accelerate", "build the fast model from a timm model (+ plan) and save it", _accelerate_arguments,
                 _accelerate_run)


# ----------------------------------------------------------------------------------- bench
def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from sparsevit.benchmark import PRESETS

    add_model_arguments(p)
    p.add_argument("--plan", default=None, help="plan JSON to benchmark")
    p.add_argument("--preset", default="heads_mlp_50", choices=list(PRESETS),
                   help="synthetic plan when --plan is not given")
    p.add_argument("--batch", type=_positive("--batch"), default=8)
    p.add_argument("--threads", type=_positive("--threads"), default=None, help="CPU threads (default: torch's)")
    p.add_argument("--runs", type=_positive("--runs"), default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backend", default="auto", choices=list(BACKENDS))


def _bench_run(args: argparse.Namespace) -> int:
    import torch

    import sparsevit
    from sparsevit.benchmark import PRESETS, median_ms, time_models

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args)
    plan = sparsevit.SparsityPlan.load(args.plan) if args.plan else PRESETS[args.preset](model)
    fast = sparsevit.accelerate(model, plan, backend=args.backend, batch_hint=args.batch)
    size = model_img_size(model)
    x = torch.randn(args.batch, 3, size, size)
    times = time_models({"dense": model, "sparsevit": fast}, x, args.warmup, args.runs)
    t_d, t_f = median_ms(times["dense"]), median_ms(times["sparsevit"])
    macs = plan.summary(model, as_dict=True)["total"]["mac_ratio"]
    print(f"{args.model} batch {args.batch}, {torch.get_num_threads()} threads, median of {args.runs}")
    print(f"dense {t_d:.2f} ms | sparsevit {t_f:.2f} ms | speed-up {t_d / t_f:.2f}x | MAC reduction {macs:.2f}x"
          f" | efficiency {t_d / t_f / macs:.2f}")
    return 0


register_command("bench", "time dense timm vs accelerated side by side", _bench_arguments, _bench_run)


# ----------------------------------------------------------------------------------- export
def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="accelerated model file (.sparsevit) from `sparsevit accelerate`")
    p.add_argument("--out", required=True, help="where to write the exported program (.pt2 or .onnx)")
    p.add_argument("--format", choices=("pt2", "onnx", "aoti"), default="pt2",
                   help="pt2: torch.export (runs where sparsevit is installed); onnx: structured plans as a "
                        "standard ONNX graph; aoti: an AOTInductor package runnable from C++")
    p.add_argument("--densify", action="store_true",
                   help="onnx only: export layers that hold sparse weights as dense Linears (a warning each) "
                        "instead of refusing them")
    p.add_argument("--input-size", type=_positive("--input-size"), nargs=4, default=None, metavar=("B", "C", "H", "W"),
                   help="input shape to export for (default: batch 1 at the model's own size)")


def _export_run(args: argparse.Namespace) -> int:
    import torch

    import sparsevit

    _check_out(args.out)
    fast = sparsevit.load(args.model)
    dtype = next(fast.parameters()).dtype
    size = model_img_size(fast)
    shape = args.input_size or [1, 3, size, size]
    if shape[1:] != [3, size, size]:
        raise ValueError(f"--input-size {' '.join(map(str, shape))} does not fit {args.model}, which takes "
                         f"B x 3 x {size} x {size} images; e.g. --input-size 1 3 {size} {size}")
    result = sparsevit.export(fast, torch.randn(*shape, dtype=dtype), args.out, format=args.format,
                              densify=args.densify)
    how = {"pt2": "load with torch.export.load after `import sparsevit`",
           "onnx": "runs in ONNX Runtime / OpenVINO / TensorRT", "aoti": "AOTInductor package; see docs/deploy.md"}
    if args.format == "onnx":
        print(result)
    print(f"exported {args.model} for input {tuple(shape)} to {args.out} ({how[args.format]})")
    return 0


register_command("export", "export an accelerated model (.sparsevit -> .pt2 | .onnx | AOTInductor .pt2)",
                 _export_arguments, _export_run)


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="an accelerated model (.sparsevit) or a plan (.json)")
    p.add_argument("--png", default=None, help="also draw what each block keeps as a heat map (needs matplotlib)")


def _report_run(args: argparse.Namespace) -> int:
    import sparsevit
    from sparsevit.plan import SparsityPlan

    if args.png:
        _check_out(args.png)
    if args.file.endswith(".json"):
        plan = SparsityPlan.load(args.file)
    else:
        fast = sparsevit.load(args.file)
        plan = fast.sparsevit_plan
        print(fast.sparsevit_report.table())
        print()
    if plan.meta.get("stats") is not None:
        print(plan.summary())
    else:
        print("(this plan stores no parameter/MAC statistics; sparsevit.summary(model, plan) computes them)")
    if args.png:
        from sparsevit.visualize import plot_plan

        print(f"heat map of kept units written to {plot_plan(plan, args.png, title=os.path.basename(args.file))}")
    return 0


register_command("report", "print a model's per-layer report (or a plan's summary); --png draws the plan",
                 _report_arguments, _report_run)


# ----------------------------------------------------------------------------------- entry point
class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are exceptions (one line from ``main``), never silent typos."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # `--optoin` or `--opt` is an error, not a guess
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise _UsageError(f"{self.prog}: {message}")


class _UsageError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsevit", description="Prune timm Vision Transformers and run them on sparse kernels.")
    parser.add_argument("--list-methods", action="store_true", help="list registered pruning methods")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_, description=help_))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; every error is one line on stderr and exit code 2 (``SPARSEVIT_DEBUG=1``
    re-raises it with its traceback)."""
    from sparsevit.errors import SparseVitError

    try:
        return _main(argv)
    except (SparseVitError, ValueError, FileNotFoundError, OSError) as exc:
        if os.environ.get("SPARSEVIT_DEBUG") == "1":
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


def _main(argv: Optional[List[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_methods:
        from sparsevit.prune.registry import available_methods

        for k, v in available_methods().items():
            print(f"{k:24s} {v}")
        return 0
    if not args.command:
        parser.print_help()
        return 1
    return int(COMMANDS[args.command][2](args) or 0)


if __name__ == "__main__":
    sys.exit(main())
