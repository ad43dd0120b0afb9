"""`resforge` command line: a thin layer over resforge.api (one function per subcommand).

    resforge train [--recipe NAME|FILE] [--data SRC] [--model NAME] [key=value ...]
    resforge train --resume runs/NAME
    resforge eval RUN_OR_WEIGHTS [--data SRC] [--model NAME] [--split test] [--tta]
    resforge predict RUN_WEIGHTS_OR_EXPORT FILES_OR_FOLDERS... [--topk 5] [--out preds.csv] [--workers N] [--ood]
    resforge export RUN_OR_WEIGHTS [--format onnx|torchscript] [--out FILE] [--samples DIR]
                    [--int8 [--calibration N] [--int8-tolerance POINTS] [--data SOURCE]]
    resforge serve RUN_OR_EXPORT [--host 127.0.0.1] [--port 8000] [--backend torch|onnx|torchscript]
    resforge models
    resforge data scan SRC
    resforge recipes
    resforge config [--section train]
    resforge finetune --from RUN_OR_WEIGHTS --data SRC [--policy POLICY] [--recipe R] [key=value ...]
    resforge lr-find [--from RUN_OR_WEIGHTS] [--data SRC] [--policy POLICY] [key=value ...]
    resforge update MODEL --data NEW [--method naive|replay|lwf|derpp] [--align] [--buffer N]
                    [--rename OLD=NEW] [--merge DATA=MODEL] [key=value ...]
    resforge versions RUN
    resforge fewshot MODEL --support DIR [--shots K] [--centre base|support|none] [--finetune-epochs N]
    resforge experiment degradation [--depths 20,56] [--epochs N] [--seeds S] [--jobs N] [--report] [key=value ...]
    resforge bench [RECIPE_OR_RUN] [--data SRC] [--seconds S] [--steps N] [--json OUT] [key=value ...]

Failures expected in use (a bad option or value, a missing or unreadable file, a full disk) are
one line on stderr naming the file or value and what to do; `--debug` (or RESFORGE_DEBUG=1) shows
the traceback instead.  Exit codes: EXIT_CODES below (also in `resforge --help`).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import sys
import textwrap
from pathlib import Path

from resforge import __version__

SHORTCUTS = {"data": "data.source", "model": "model.name", "epochs": "train.epochs",
             "batch_size": "train.batch_size", "lr": "optim.lr", "device": "train.device",
             "name": "train.name", "project": "train.project", "seed": "train.seed",
             "pretrained": "model.pretrained", "threads": "train.threads", "class_names": "data.class_names"}

EXIT_CODES = {0: "done", 1: "predict read none of its files",
              2: "usage or input error (option, config value, data, weights)",
              3: "operating-system error (disk full, no permission, I/O error)", 4: "out of memory",
              130: "interrupted (Ctrl-C)", 141: "output pipe closed (e.g. resforge predict ... | head)"}
MODEL_HELP = "architecture, for third-party weights (default: the one the checkpoint names)"
def _positive(text: str) -> float:
    """argparse type for sizes and durations that must be > 0 (seconds, MB, ms)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return x


def _nonnegative(text: str) -> float:
    """argparse type for a wait that may be 0 (no waiting)."""
    x = _positive(text) if text.strip() not in ("0", "0.0") else 0.0
    return x


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1..65535, or 0: any free port)")
    return int(text)


THREADS_HELP = "CPU threads (default: auto: the cores not already busy, from the load average)"


def _train(a) -> int:
    from resforge.config import load_config
    overrides = [f"{SHORTCUTS[k]}={v}" for k, v in vars(a).items() if k in SHORTCUTS and v is not None]
    overrides += a.overrides
    # No recipe: the embedded digits set when no data is named, else the general default.
    recipe = a.recipe or ("default" if a.data else "digits")
    # Resolved (and validated) before torch is imported: a bad value is reported at once.
    config = None if a.resume else load_config(recipe, overrides)
    a.writes_to = a.resume or (config.train.project if config else None)    # named by an OSError without a file
    if _distributed(a):
        return _relaunch(a)
    from resforge import api
    api.train(None if a.resume else recipe, overrides, resume=a.resume, config=config)
    return 0


def _add_nproc(p, what: str) -> None:
    p.add_argument("--nproc", type=_count, default=1, metavar="N",
                   help=f"{what} as N processes on this machine (DistributedDataParallel through torchrun's "
                        "launcher; gloo on CPU, NCCL with one GPU each); train.batch_size stays the global batch")
    p.add_argument("--max-restarts", type=int, default=0, metavar="K",
                   help="with --nproc: restart the processes up to K times if one dies")


def _distributed(a) -> bool:
    """--nproc N > 1, not yet inside one of the N processes."""
    return a.nproc > 1 and "WORLD_SIZE" not in os.environ


def _relaunch(a) -> int:
    """This command again as a.nproc processes, through torchrun's launcher."""
    from resforge.distributed import launch
    return launch(a.nproc, _without(a.argv, ("--nproc", "--max-restarts")), a.max_restarts)


def _without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """argv minus the given options and their values (`--opt V` and `--opt=V`)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in options:
            skip = True
        elif not item.startswith(tuple(o + "=" for o in options)):
            out.append(item)
    return out


def _source(a) -> str:
    src = a.weights or a.source
    if not src:
        raise ValueError("name the model to use: a run folder or weights file (SOURCE or --weights)")
    _check_weights_name(src, "SOURCE", f"resforge {a.command} PATH ...")
    return src


def _check_weights_name(value: str | None, what: str, use: str) -> None:
    """`--from resnet18`: a model name where a local weights file belongs -> where to get one."""
    if value:
        from resforge.config import check_weights_path
        check_weights_path(value, what, use)


def _device(text: str) -> str:
    """--device checked before torch loads (a typo is reported at once); hardware checks come later."""
    from resforge.training.device_names import one_device
    one_device(text)
    return text


def _eval(a) -> int:
    source, device = _source(a), _device(a.device)
    if a.threads is not None:            # api.evaluate's runtime reads it (training/device.py)
        os.environ["RESFORGE_THREADS"] = str(a.threads)
    from resforge import api
    api.evaluate(source, data=a.data, splits=a.split or ["test"], tta=a.tta, model=a.model,
                 batch_size=a.batch_size, out_dir=a.out, device=device, data_root=a.data_root,
                 download=a.download)
    return 0


def _predict(a) -> int:
    _device(a.device)
    _check_weights_name(a.source, "SOURCE", "resforge predict PATH FILES...")
    from resforge.infer import format_predictions, predict, save_predictions
    from resforge.training.device import select_device
    device = select_device(a.device)
    rows = predict(a.source, a.inputs, topk=a.topk, batch_size=a.batch_size, device=device,
                   model_name=a.model, workers=a.workers, threads=a.threads, ood=a.ood)
    print(format_predictions(rows))
    if a.out:
        print(f"saved: {save_predictions(rows, a.out)}")
    return 1 if rows and all(r["error"] for r in rows) else 0


def _models(a) -> int:
    from resforge.models import list_models, model_info
    print(f"{'model':<12} {'params':>12} {'layout':<9} {'input':<10} stages")
    for name in list_models():
        i = model_info(name)
        size = "x".join(map(str, i["input_size"]))
        print(f"{name:<12} {i['params'] / 1e6:>11.2f}M {i['layout']:<9} {size:<10} {','.join(i['stage_names'])}")
    return 0


def _scan(a) -> int:
    from resforge.data import format_scan, scan
    kw = {"image_size": a.image_size, "channels": a.channels, "data_root": a.data_root, "stream": False}
    report = scan(a.source, **{k: v for k, v in kw.items() if v is not None})
    print(format_scan(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"saved: {a.json}")
    return 0


def _cache(a) -> int:
    from resforge.data import cache_tools
    from resforge.data.cache import resolve_cache_dir
    if a.cache_command == "list":
        print(cache_tools.format_listing(cache_tools.list_entries(a.dir)))
        return 0
    picked, freed = cache_tools.clear(a.dir, a.older_than, a.source, a.all, a.dry_run)
    print(cache_tools.format_cleared(picked, freed, a.dry_run, resolve_cache_dir(a.dir)))
    return 0


def _add_cache(sub) -> None:
    k = sub.add_parser("cache", help="list or clear the decoded-data cache (RESFORGE_CACHE)",
                       description="Decoded uint8 tensors of each data source, one entry per source content "
                                   "and decode settings (image size, channels, resize), in RESFORGE_CACHE "
                                   "(default ~/.cache/resforge/cache). Only entries are removed, never other files.")
    ksub = k.add_subparsers(dest="cache_command", required=True)
    ls = ksub.add_parser("list", help="entries: source, image size, channels, images, size on disk, last use")
    cl = ksub.add_parser("clear", help="remove entries (at least one of --older-than, --source, --all)")
    cl.add_argument("--older-than", type=_nonneg_float, default=None, metavar="DAYS",
                    help="entries not read for this many days (default: no age filter)")
    cl.add_argument("--source", default=None, metavar="NAME",
                    help="entries of this source: its name (folder / .npz stem, cifar10) or path (default: any)")
    cl.add_argument("--all", action="store_true", help="every entry and the memos (default: off)")
    cl.add_argument("--dry-run", action="store_true", help="only print what would be freed (default: off)")
    for q in (ls, cl):
        q.add_argument("--dir", default=None,
                       help="cache folder (default: RESFORGE_CACHE, else ~/.cache/resforge/cache)")
        q.set_defaults(fn=_cache)


def _nonneg_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not x >= 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return x


def _recipes(a) -> int:
    from resforge.config import RECIPE_DIR, list_recipes, recipe_summary
    for r in list_recipes():
        text = recipe_summary((RECIPE_DIR / f"{r}.yaml").read_text(encoding="utf-8"))
        print(textwrap.fill(text, width=110, initial_indent=f"{r:<22} ", subsequent_indent=" " * 23))
    return 0


def _config(a) -> int:
    from resforge.config import describe_keys
    print(describe_keys(a.section))
    print("\nSet any key as key=value after a command (train optim.lr=0.05), or in a recipe YAML.")
    return 0


def _seeds(text: str) -> list[int]:
    """'3' -> three seeds 0, 1, 2; '0,4,7' -> exactly those."""
    parts = [int(v) for v in text.split(",") if v.strip()]
    return list(range(parts[0])) if len(parts) == 1 and "," not in text else parts


def _degradation(a) -> int:
    from resforge import api
    overrides = ([f"data.data_root={a.data_root}"] if a.data_root else []) + a.overrides
    where = dict(depths=[int(d) for d in a.depths.split(",")], seeds=_seeds(a.seeds), recipe=a.recipe,
                 epochs=a.epochs, overrides=overrides, name=a.name, project=a.project)
    if a.report:
        summary = api.degradation_report(**where)
    else:
        summary = api.degradation(**where, jobs=a.jobs)
    out = Path(a.project) / summary["experiment"]
    print(f"degradation: wrote {out}/degradation.png, degradation.md, grad_norms.png", flush=True)
    return 0


def _add_experiment(sub) -> None:
    x = sub.add_parser("experiment", help="reproduce published experiments (one command each)")
    xsub = x.add_subparsers(dest="experiment", required=True)
    g = xsub.add_parser("degradation", help="He et al. 2016 Fig. 6: plainD vs resnetD twins, one recipe",
                        description="Train plain and residual twins of each depth with one recipe (resumes "
                                    "unfinished runs, skips finished ones), then write degradation.png/.md/.json "
                                    "and grad_norms.png under PROJECT/degradation-NAME/.")
    g.add_argument("--depths", default="20,56", help="comma list of depths 6n+2 (default 20,56)")
    g.add_argument("--epochs", type=_count, default=None, help="override the recipe's epochs (default: the recipe's)")
    g.add_argument("--seeds", default="1", help="N (seeds 0..N-1) or a comma list, e.g. 0,1,2")
    g.add_argument("--recipe", default="he2016-cifar10-short", help="he2016-cifar10-short | he2016-cifar10 | path")
    g.add_argument("--name", default=None, help="experiment name (default: the recipe name)")
    g.add_argument("--project", default="runs")
    g.add_argument("--data-root", default=None, help="folder holding cifar-10-binary.tar.xz (default: RESFORGE_DATA)")
    g.add_argument("--jobs", type=_count, default=1,
                   help="runs trained at once, each with cores/jobs threads (2 on a 2-core CPU: ~1.25x the throughput)")
    g.add_argument("--report", action="store_true",
                   help="train nothing: redraw the figure and table from the runs as they stand (unfinished runs "
                        "up to their last epoch), e.g. while another process trains them")
    g.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")
    g.set_defaults(fn=_degradation)


def _bench(a) -> int:
    overrides = [f"{SHORTCUTS[k]}={v}" for k in ("data", "threads") if (v := getattr(a, k)) is not None]
    from resforge import api
    result = api.bench(a.target, overrides + a.overrides, seconds=a.seconds, steps=a.steps, json_out=a.json)
    from resforge.bench import format_bench
    print(format_bench(result))
    if a.json:
        print(f"saved: {a.json}")
    return 0


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="this machine's peak FLOP/s, a recipe's compute floor, where a run's time went",
                       description="Measure the sustained matmul peak (fp32; bf16 only where the CPU runs it "
                                   "natively) and the recipe's own conv layers on the threads, precision and layout "
                                   "a run would use; time the model's bare training step (synthetic in-memory "
                                   "batch) against resforge's real one; print the recipe's training FLOPs and its "
                                   "compute floors (FLOPs / peak, and images x the bare step). Given a finished run "
                                   "folder: also its training wall time / each floor. A PyTorch-profiler breakdown "
                                   "of a few real steps says where the rest goes. Run it on an idle machine: the "
                                   "load average is printed.")
    b.add_argument("target", nargs="?", default=None, metavar="RECIPE_OR_RUN",
                   help="recipe name or YAML path, or a finished run folder (default: digits)")
    b.add_argument("--data", default=None, help="= data.source (default: the recipe's, or the run's)")
    b.add_argument("--threads", type=_count, default=None, help=THREADS_HELP)
    b.add_argument("--seconds", type=_positive, default=3.0,
                   help="wall seconds of each timed measurement (matmuls, conv shapes, each step kind per round)")
    b.add_argument("--steps", type=int, default=2, help="real training steps profiled for the breakdown (0: none)")
    b.add_argument("--json", default=None, metavar="OUT", help="also write every figure as JSON (default: print only)")
    b.add_argument("overrides", nargs="*", metavar="key=value")
    b.set_defaults(fn=_bench)


FT_SHORTCUTS = {"epochs": "train.epochs", "lr": "optim.lr", "batch_size": "train.batch_size",
                "device": "train.device", "name": "train.name", "project": "train.project",
                "seed": "train.seed", "input_size": "finetune.input_size", "threads": "train.threads",
                "class_names": "data.class_names"}


def _ft_overrides(a) -> list[str]:
    return [f"{FT_SHORTCUTS[k]}={v}" for k, v in vars(a).items() if k in FT_SHORTCUTS and v is not None] + a.overrides


def _finetune(a) -> int:
    from resforge import api
    _check_weights_name(a.source, "--from", f"resforge {a.command} --from PATH, or model.pretrained=PATH")
    if _distributed(a):
        return _relaunch(a)
    api.finetune(a.source, data=a.data, policy=a.policy, recipe=a.recipe, overrides=_ft_overrides(a), model=a.model)
    return 0


def _lr_find(a) -> int:
    from resforge import api
    _check_weights_name(a.source, "--from", f"resforge {a.command} --from PATH, or model.pretrained=PATH")
    api.lr_find(a.source, data=a.data, policy=a.policy, recipe=a.recipe, overrides=_ft_overrides(a),
                model=a.model, start=a.start_lr, end=a.end_lr, steps=a.steps, out=a.out)
    return 0


def _add_finetune(sub) -> None:
    f = sub.add_parser("finetune", help="fine-tune pretrained weights with a policy; writes a before/after report",
                       description="Start from a resforge run/checkpoint, a torchvision/timm ImageNet ResNet or an "
                                   "akamaster CIFAR ResNet; new head for the data's classes. Report rows: (a) prototype "
                                   "head, (b) linear probe, (c) the policy, on the same test split. Any config key can "
                                   "be overridden as key=value (finetune.bn=freeze-stats, finetune.input_size=128, ...).")
    f.add_argument("--from", dest="source", required=True, metavar="RUN_OR_WEIGHTS",
                   help="run folder or local weights file to start from (required)")
    f.add_argument("--policy", default=None, help="linear-probe | last-stages:K | stages:A,B | full | gradual | bitfit | lora "
                                                  "(default: the recipe's finetune.policy)")
    _add_nproc(f, "fine-tune")
    lr = sub.add_parser("lr-find", help="learning-rate range test: plot and suggested optim.lr",
                        description="Sweep the rate geometrically while training, record the loss, suggest a rate. "
                                    "With --from: for that fine-tuning policy's main phase; without: for the recipe's "
                                    "model from scratch.")
    lr.add_argument("--from", dest="source", default=None, metavar="RUN_OR_WEIGHTS",
                    help="weights to fine-tune (default: none, the recipe's model from scratch)")
    lr.add_argument("--policy", default=None, help="fine-tuning policy (default: the recipe's finetune.policy)")
    lr.add_argument("--start-lr", type=float, default=1e-6)
    lr.add_argument("--end-lr", type=float, default=1.0)
    lr.add_argument("--steps", type=_count, default=100)
    lr.add_argument("--out", default=None, help="output folder (default: PROJECT/lr-find)")
    for q, fn in ((f, _finetune), (lr, _lr_find)):
        q.add_argument("--data", default=None,
                       help="data source (.npz, folder, cifar10, ...) (default: the recipe's data.source)")
        q.add_argument("--recipe", default="finetune", help="recipe name or YAML path (default: finetune)")
        q.add_argument("--model", default=None, help=MODEL_HELP + " (checked for checkpoints)")
        for k in FT_SHORTCUTS:
            q.add_argument(f"--{k.replace('_', '-')}", dest=k, default=None,
                           help=f"= {FT_SHORTCUTS[k]} (default: the recipe's; see `resforge config`)")
        q.add_argument("overrides", nargs="*", metavar="key=value")
        q.set_defaults(fn=fn)


def _fewshot(a) -> int:
    device = _device(a.device)
    from resforge import api
    api.fewshot(a.source, a.support, shots=a.shots, centre=a.centre, seed=a.seed, data_root=a.data_root,
                device=device, finetune_epochs=a.finetune_epochs)
    return 0


def _add_fewshot(sub) -> None:
    f = sub.add_parser("fewshot", help="add classes from a few images each (prototype rows): a new model version",
                       description="Each class folder of --support (DIR/<class>/<image>) becomes one classifier row: "
                                   "the centred, L2-normalised mean feature of --shots of its images, scaled to compete "
                                   "with the old classes. Writes RUN/versions/vN; export, serve, predict and eval take "
                                   "it as RUN@vN.")
    f.add_argument("source", metavar="MODEL", help="run folder (its latest version), RUN@vN or RUN/versions/vN")
    f.add_argument("--support", required=True, metavar="DIR", help="one sub-folder of images per new class (required)")
    f.add_argument("--shots", type=_count, default=5, help="images per new class, 1..20")
    f.add_argument("--centre", choices=["base", "support", "none"], default=None,
                   help="feature mean subtracted before normalising (default: base, the model's training data; "
                        "none for classifiers without a bias)")
    f.add_argument("--seed", type=int, default=0, help="which images of a larger class folder are used")
    f.add_argument("--finetune-epochs", type=int, default=0,
                   help="then train the classifier (backbone and BatchNorm frozen) on the support images and a "
                        "sample of the model's own data for N epochs (0: prototype rows only)")
    f.add_argument("--data-root", default=None, help="folder holding named sources (default: RESFORGE_DATA)")
    f.add_argument("--device", default="auto", help="auto | cpu | mps | cuda | cuda:N | N")
    f.set_defaults(fn=_fewshot)


_INT8_FLAGS = {"calibration": "--calibration", "int8_tolerance": "--int8-tolerance", "data": "--data",
               "data_root": "--data-root"}


def _export(a) -> int:
    given = [flag for key, flag in _INT8_FLAGS.items() if getattr(a, key) is not None]
    if given and not a.int8:
        raise ValueError(f"{', '.join(given)} only apply to an int8 export: add --int8 (with --format onnx)")
    if a.int8 and a.format != "onnx":
        raise ValueError(f"--int8 quantises ONNX exports only, not {a.format}: use --format onnx "
                         "(TorchScript artifacts stay float32)")
    try:
        from resforge.api import export
        from resforge.quantize import Int8Options
        int8 = False
        if a.int8:
            defaults = Int8Options()
            int8 = Int8Options(calibration=a.calibration or defaults.calibration, data=a.data,
                               tolerance=defaults.tolerance if a.int8_tolerance is None else a.int8_tolerance,
                               data_root=a.data_root)
        result = export(a.source, a.format, a.out, model_name=a.model, samples=a.samples, int8=int8)
    except ImportError as e:                      # optional extra missing: say which
        print(f"resforge: error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


_SERVE_LIMITS = ("max_request_pixels", "max_decodes", "decode_wait_s", "body_timeout_s", "header_timeout_s",
                 "max_connections")


def _serve(a) -> int:
    try:
        from resforge.serve import serve
        serve(a.source, host=a.host, port=a.port, backend=a.backend, model_name=a.model,
              max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, max_upload_bytes=int(a.max_upload_mb * 1e6),
              max_pixels=a.max_pixels, max_files=a.max_files, threads=a.threads, log_level=a.log_level,
              **{k: getattr(a, k) for k in _SERVE_LIMITS})
    except ImportError as e:
        print(f"resforge: error: {e}", file=sys.stderr)
        return 2
    return 0


UPDATE_SHORTCUTS = {"epochs": "train.epochs", "lr": "optim.lr", "batch_size": "train.batch_size",
                    "device": "train.device", "seed": "train.seed", "threads": "train.threads",
                    "selection": "continual.selection", "class_names": "data.class_names"}


def _update(a) -> int:
    from resforge import api
    overrides = [f"{UPDATE_SHORTCUTS[k]}={v}" for k, v in vars(a).items()
                 if k in UPDATE_SHORTCUTS and v is not None] + a.overrides
    api.update(a.model, a.data, method=a.method, overrides=overrides, rename=a.rename, merge=a.merge,
               buffer_size=a.buffer, align=True if a.align else None, buffer_file=a.replay_buffer,
               data_root=a.data_root)
    return 0


def _versions(a) -> int:
    from resforge import api
    print(api.versions(a.run))
    return 0


def _add_continual(sub) -> None:
    u = sub.add_parser("update", help="update a model on new data without forgetting; writes a new model version",
                       description="Fine-tune the latest version of a run (or RUN@vN) on new data: new classes grow "
                                   "the head, the same classes under a new distribution work the same way. Writes "
                                   "RUN/versions/v(N+1) (weights, replay buffer, data manifests, report with old/new "
                                   "accuracy and forgetting); the parent is never changed. Any config key can be "
                                   "set as key=value (continual.alpha=0.1, train.epochs=5, ...).")
    u.add_argument("model", metavar="MODEL", help="run folder (its latest version), RUN@vN or RUN/versions/vN")
    u.add_argument("--data", required=True, help="the new data: folder, .npz, cifar10, ... (required)")
    u.add_argument("--method", default=None, choices=["naive", "replay", "lwf", "derpp"],
                   help="how old knowledge is kept (default: the parent's continual.method; derpp on a run's first update)")
    u.add_argument("--align", action="store_true",
                   help="weight aligning after training: rescale the new classes' head rows (default: off)")
    u.add_argument("--buffer", type=int, default=None, metavar="N",
                   help="replay buffer size in images (default: the parent's continual.buffer_size; 500 at first)")
    u.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                   help="rename a class of the model (repeatable) (default: none)")
    u.add_argument("--merge", action="append", default=[], metavar="DATA=MODEL",
                   help="the data's class DATA is the model's class MODEL (repeatable) (default: none)")
    u.add_argument("--replay-buffer", default=None, metavar="FILE",
                   help="start from this buffer file (same lineage) instead of the parent's (default: the parent's)")
    u.add_argument("--data-root", default=None, help="folder holding named sources (default: RESFORGE_DATA)")
    for k in UPDATE_SHORTCUTS:
        u.add_argument(f"--{k.replace('_', '-')}", dest=k, default=None,
                       help=f"= {UPDATE_SHORTCUTS[k]} (default: the parent's; see `resforge config`)")
    u.add_argument("overrides", nargs="*", metavar="key=value")
    u.set_defaults(fn=_update)
    v = sub.add_parser("versions", help="list the model versions of a run with their metrics")
    v.add_argument("run", metavar="RUN", help="run folder")
    v.set_defaults(fn=_versions)


def _add_deploy(sub) -> None:
    x = sub.add_parser("export", help="export to ONNX or TorchScript (parity-checked against PyTorch)")
    x.add_argument("source", help="run folder, resforge checkpoint or weights file")
    x.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    x.add_argument("--out", default=None, help="output file (default: next to the weights, .onnx/.torchscript; "
                                               "--int8: .int8.onnx)")
    x.add_argument("--samples", nargs="+", default=None, metavar="PATH",
                   help="images for the parity check (default: the run's own held-out data)")
    x.add_argument("--model", default=None, help=MODEL_HELP)
    x.add_argument("--int8", action="store_true",
                   help="static int8 quantisation with ONNX Runtime (QDQ, per-channel int8 weights), calibrated "
                        "on the run's training images and refused unless its top-1 on the run's test split "
                        "is within --int8-tolerance of fp32")
    x.add_argument("--calibration", type=_count, default=None, metavar="N",
                   help="--int8: training images to calibrate on (default: 512)")
    x.add_argument("--int8-tolerance", type=_nonnegative, default=None, metavar="POINTS",
                   help="--int8: largest top-1 drop vs fp32 allowed, in percentage points (default: 0.5)")
    x.add_argument("--data", default=None, metavar="SOURCE",
                   help="--int8: labelled data to calibrate (train split) and check (test, else val) with, "
                        "for weights outside a run folder (default: the run's own data)")
    x.add_argument("--data-root", default=None, help="--int8: folder holding named sources (default: RESFORGE_DATA)")
    x.set_defaults(fn=_export)

    v = sub.add_parser("serve", help="HTTP inference service with a web page (needs resforge[serve])")
    v.add_argument("source", help="run folder, weights file, or an exported .onnx/.torchscript")
    v.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    v.add_argument("--port", type=_port, default=8000, help="TCP port to listen on")
    v.add_argument("--backend", choices=["auto", "torch", "onnx", "torchscript"], default="auto",
                   help="auto: what the source is (weights -> torch, .onnx -> onnx)")
    v.add_argument("--model", default=None, help=MODEL_HELP)
    v.add_argument("--max-batch", type=_count, default=32, help="micro-batch size limit (1 = no batching)")
    v.add_argument("--max-wait-ms", type=_nonnegative, default=5.0, help="how long a batch waits to fill up")
    v.add_argument("--max-upload-mb", type=_positive, default=20.0, help="request body limit, in MB")
    v.add_argument("--max-pixels", type=_count, default=40_000_000, help="per-image pixel limit (bomb guard)")
    v.add_argument("--max-files", type=_count, default=64, help="images per request")
    v.add_argument("--max-request-pixels", type=_count, default=100_000_000, help="decoded pixels per request, all files")
    v.add_argument("--max-decodes", type=_count, default=2, help="requests decoding images at once (bounds memory)")
    v.add_argument("--decode-wait-s", type=_positive, default=10.0, help="wait for a decode slot before a 503")
    v.add_argument("--body-timeout-s", type=_positive, default=30.0, help="whole request body deadline (408)")
    v.add_argument("--header-timeout-s", type=_positive, default=10.0, help="request headers deadline (408)")
    v.add_argument("--max-connections", type=_count, default=64, help="open connections; more get a 503")
    v.add_argument("--threads", type=_count, default=None, help="CPU threads for the model (default: one per core)")
    v.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="debug also logs every request")
    v.set_defaults(fn=_serve)


class _Help(argparse.HelpFormatter):
    """Every option shows its default: appended where the help does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default in (None, argparse.SUPPRESS)
                or "default" in text.lower()):
            return text          # None defaults are explained in the help itself (tests/test_cli.py)
        shown = "off" if action.default is False else str(action.default).replace("%", "%%")
        return f"{text} (default: {shown})".lstrip()


class _Parser(argparse.ArgumentParser):
    """Every (sub)command: defaults in --help, and --debug accepted before or after the command."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the full traceback of an error (also: RESFORGE_DEBUG=1) (default: off)")


def _count(text: str) -> int:
    """argparse type for counts that must be >= 1 (batch sizes, top-k, threads)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be at least 1")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="resforge", description="Train, fine-tune, evaluate and serve ResNets.",
                epilog="Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()) + ".")
    p.add_argument("--version", action="version", version=f"resforge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (default: the embedded digits recipe)",
                       description="Train from a recipe; any config key can be overridden as key=value "
                                   "(e.g. optim.lr=0.05 or lr=0.05). See `resforge recipes`.")
    t.add_argument("--recipe", default=None,
                   help="recipe name (configs/NAME.yaml) or YAML path; default: digits, or default with --data")
    for k in SHORTCUTS:
        t.add_argument(f"--{k.replace('_', '-')}", dest=k, default=None,
                       help=f"= {SHORTCUTS[k]} (default: the recipe's; see `resforge config`)")
    t.add_argument("--resume", default=None, metavar="RUN",
                   help="continue an interrupted run folder (default: start a new run)")
    _add_nproc(t, "train")
    t.add_argument("overrides", nargs="*", metavar="key=value")
    t.set_defaults(fn=_train)

    e = sub.add_parser("eval", help="evaluate a run or weights file on a data split")
    e.add_argument("source", nargs="?", help="run folder, resforge checkpoint, or torchvision/timm/akamaster weights")
    e.add_argument("--weights", default=None, help="same as SOURCE (default: SOURCE)")
    e.add_argument("--data", default=None, help="data source (default: the run's own)")
    e.add_argument("--model", default=None, help=MODEL_HELP + ", e.g. resnet56")
    e.add_argument("--split", action="append", help="split(s) to evaluate (default test; repeatable)")
    e.add_argument("--tta", action="store_true", help="test-time augmentation: the views the network trained "
                   "with (mirror if it trained with flips, 1-px shifts if with translations)")
    e.add_argument("--batch-size", type=_count, default=512)
    e.add_argument("--out", default=None, help="new report folder (default: RUN/eval/<weights>-<splits>[-tta]; "
                   "the run's own report is never replaced)")
    e.add_argument("--device", default="auto", help="auto | cpu | mps | cuda | cuda:N | N")
    e.add_argument("--threads", type=_count, default=None, help=THREADS_HELP)
    e.add_argument("--data-root", default=None, help="folder holding named sources (default: RESFORGE_DATA)")
    e.add_argument("--download", action="store_true", help="fetch a named source that is missing")
    e.set_defaults(fn=_eval)

    r = sub.add_parser("predict", help="predict classes of image files or folders")
    r.add_argument("source", help="run folder, weights file, or an exported .onnx (fp32 or int8) / .torchscript")
    r.add_argument("inputs", nargs="+", help="image files and/or folders")
    r.add_argument("--topk", type=_count, default=5, help="labels per file")
    r.add_argument("--batch-size", type=_count, default=64)
    r.add_argument("--model", default=None, help=MODEL_HELP)
    r.add_argument("--device", default="auto", help="auto | cpu | mps | cuda | cuda:N | N")
    r.add_argument("--threads", type=_count, default=None, help=THREADS_HELP)
    r.add_argument("--out", default=None, help="write predictions to .csv or .json (default: print only)")
    r.add_argument("--workers", type=_count, default=None, help="decoding threads (default: CPU cores, max 8)")
    r.add_argument("--ood", action="store_true",
                   help="flag images unlike the training data: adds the energy score and OOD yes/no per file "
                        "(threshold fitted on the validation split; about 5%% of in-distribution images are flagged)")
    r.set_defaults(fn=_predict)
    _add_deploy(sub)

    m = sub.add_parser("models", help="list the model registry")
    m.set_defaults(fn=_models)

    rc = sub.add_parser("recipes", help="list the named training recipes")
    rc.set_defaults(fn=_recipes)

    c = sub.add_parser("config", help="list every config key with its type, default and meaning")
    c.add_argument("--section", default=None, help="only this section: data, model, aug, optim, train, eval, "
                                                   "finetune, continual (default: all)")
    c.set_defaults(fn=_config)

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("scan", help="per-class counts, rejected files, duplicates and leaks")
    s.add_argument("source")
    s.add_argument("--image-size", type=_count, default=None, help="resize to this side (default: the source's own)")
    s.add_argument("--channels", type=int, choices=[1, 3], default=None, help="default: the source's own")
    s.add_argument("--data-root", default=None, help="folder holding named sources (default: RESFORGE_DATA)")
    s.add_argument("--json", default=None, help="also save the report as JSON (default: print only)")
    s.set_defaults(fn=_scan)
    _add_experiment(sub)
    _add_finetune(sub)
    _add_continual(sub)
    _add_cache(sub)
    _add_fewshot(sub)
    _add_bench(sub)
    return p


_OS_REMEDY = {
    errno.ENOSPC: "free some disk space, or write elsewhere (train.project, --out, RESFORGE_CACHE)",
    errno.EDQUOT: "free some of your disk quota, or write elsewhere (train.project, --out, RESFORGE_CACHE)",
    errno.EACCES: "choose a folder you may write to (train.project, --out), or fix its permissions",
    errno.EPERM: "choose a folder you may write to (train.project, --out), or fix its permissions",
    errno.EROFS: "the file system is read-only: write elsewhere (train.project, --out, RESFORGE_CACHE)",
    errno.EIO: "the disk reported an I/O error: check the device, or copy the file to another disk",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or use fewer data.workers",
}
_INPUT_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}


def explain(exc: BaseException, args=None) -> tuple[int, str] | None:
    """(exit code, one sentence) for a failure expected in use; None for a bug (traceback)."""
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":   # torch's GPU OOM too
        where = "GPU memory" if type(exc).__name__ == "OutOfMemoryError" else "memory"
        return 4, (f"out of {where}: use a smaller train.batch_size / --batch-size (and eval_batch_size), a smaller "
                   "data.image_size, or data.stream=true for sets larger than RAM")
    if isinstance(exc, pickle.UnpicklingError):
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if text.startswith("Weights only load failed") or not text:
            where = getattr(args, "source", None) or "the file"
            text = (f"{where} holds pickled Python objects, not only tensors, and resforge loads weights with "
                    "torch.load(weights_only=True) so a file cannot run code: re-save its state_dict "
                    "(torch.save(model.state_dict(), path)) or convert it to .safetensors")
        return 2, text
    if isinstance(exc, OSError) and isinstance(exc, ValueError):     # e.g. DiskFullError: its own sentence
        return 3, str(exc)
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
        name = " ".join(str(f) for f in (exc.filename, exc.filename2) if f)
        folder = getattr(args, "writes_to", None) or getattr(args, "out", None)
        what = f"{name}: " if name else (f"writing under {folder}: " if folder else "")
        reason = exc.strerror or str(exc) or type(exc).__name__
        if exc.errno in _INPUT_ERRNOS:
            return 2, f"{what}{reason}"
        remedy = _OS_REMEDY.get(exc.errno)
        return 3, f"{what}{reason}" + (f": {remedy}" if remedy else "")
    if isinstance(exc, (ValueError, FileNotFoundError)):
        # Expected user errors (bad config, bad data, bad weights) carry their own sentence.
        return 2, str(exc)
    if isinstance(exc, ImportError) and getattr(exc, "name", None) in (None, "onnx", "onnxruntime", "fastapi",
                                                                       "uvicorn", "peft", "safetensors"):
        return 2, str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `update MODEL --data NEW key=value` (and `bench RECIPE --seconds 2 key=value`): argparse fills
    # both positionals at MODEL, so key=value items after the options arrive here; anything else
    # unknown is the usual usage error.
    if extra and getattr(args, "command", None) in ("update", "bench") and \
            all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    debug = getattr(args, "debug", False) or os.environ.get("RESFORGE_DEBUG", "") not in ("", "0")
    try:
        if args.command not in ("train", "finetune") and "WORLD_SIZE" in os.environ:
            from resforge.distributed import refuse    # one process only: not N copies under torchrun
            refuse(f"`resforge {args.command}`")
        return args.fn(args)
    except BrokenPipeError:                        # `resforge predict ... | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (Exception, KeyboardInterrupt) as e:    # noqa: BLE001 - sorted by explain(); bugs re-raise
        verdict = explain(e, args)
        if debug or verdict is None:
            raise
        code, text = verdict
        print("interrupted" if code == 130 else f"resforge: error: {text}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
