"""`resforge` command line: a thin layer over resforge.api (one function per subcommand).

    resforge train [--recipe NAME|FILE] [--data SRC] [--model NAME] [key=value ...]
    resforge train --resume runs/NAME
    resforge eval RUN_OR_WEIGHTS [--data SRC] [--model NAME] [--split test] [--tta]
    resforge predict RUN_OR_WEIGHTS FILES_OR_FOLDERS... [--topk 5] [--out preds.csv] [--workers N]
    resforge export RUN_OR_WEIGHTS [--format onnx|torchscript] [--out FILE] [--samples DIR]
    resforge serve RUN_OR_EXPORT [--host 127.0.0.1] [--port 8000] [--backend torch|onnx|torchscript]
    resforge models
    resforge data scan SRC
    resforge recipes
    resforge finetune --from RUN_OR_WEIGHTS --data SRC [--policy POLICY] [--recipe R] [key=value ...]
    resforge lr-find [--from RUN_OR_WEIGHTS] [--data SRC] [--policy POLICY] [key=value ...]
    resforge experiment degradation [--depths 20,56] [--epochs N] [--seeds S] [--jobs N] [--report] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from resforge import __version__

SHORTCUTS = {"data": "data.source", "model": "model.name", "epochs": "train.epochs",
             "batch_size": "train.batch_size", "lr": "optim.lr", "device": "train.device",
             "name": "train.name", "project": "train.project", "seed": "train.seed",
             "pretrained": "model.pretrained"}


def _train(a) -> int:
    from resforge import api
    overrides = [f"{SHORTCUTS[k]}={v}" for k, v in vars(a).items() if k in SHORTCUTS and v is not None]
    overrides += a.overrides
    # No recipe: the embedded digits set when no data is named, else the general default.
    recipe = a.recipe or ("default" if a.data else "digits")
    api.train(None if a.resume else recipe, overrides, resume=a.resume)
    return 0


def _source(a) -> str:
    src = a.weights or a.source
    if not src:
        raise ValueError("name the model to use: a run folder or weights file (SOURCE or --weights)")
    return src


def _eval(a) -> int:
    from resforge import api
    api.evaluate(_source(a), data=a.data, splits=a.split or ["test"], tta=a.tta, model=a.model,
                 batch_size=a.batch_size, out_dir=a.out, device=a.device, data_root=a.data_root,
                 download=a.download)
    return 0


def _predict(a) -> int:
    from resforge.infer import format_predictions, predict, save_predictions
    rows = predict(a.source, a.inputs, topk=a.topk, batch_size=a.batch_size,
                   device=None if a.device == "auto" else a.device, model_name=a.model,
                   workers=a.workers)
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


def _recipes(a) -> int:
    from resforge.config import RECIPE_DIR, list_recipes
    for r in list_recipes():
        first = (RECIPE_DIR / f"{r}.yaml").read_text().splitlines()[0].lstrip("# ")
        print(f"{r:<22} {first}")
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
    g.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    g.add_argument("--seeds", default="1", help="N (seeds 0..N-1) or a comma list, e.g. 0,1,2")
    g.add_argument("--recipe", default="he2016-cifar10-short", help="he2016-cifar10-short | he2016-cifar10 | path")
    g.add_argument("--name", default=None, help="experiment name (default: the recipe name)")
    g.add_argument("--project", default="runs")
    g.add_argument("--data-root", default=None, help="folder holding cifar-10-binary.tar.xz (or RESFORGE_DATA)")
    g.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each with cores/jobs threads (2 on a 2-core CPU: ~1.25x the throughput)")
    g.add_argument("--report", action="store_true",
                   help="train nothing: redraw the figure and table from the runs as they stand (unfinished runs "
                        "up to their last epoch), e.g. while another process trains them")
    g.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")
    g.set_defaults(fn=_degradation)


FT_SHORTCUTS = {"epochs": "train.epochs", "lr": "optim.lr", "batch_size": "train.batch_size",
                "device": "train.device", "name": "train.name", "project": "train.project",
                "seed": "train.seed", "input_size": "finetune.input_size"}


def _ft_overrides(a) -> list[str]:
    return [f"{FT_SHORTCUTS[k]}={v}" for k, v in vars(a).items() if k in FT_SHORTCUTS and v is not None] + a.overrides


def _finetune(a) -> int:
    from resforge import api
    api.finetune(a.source, data=a.data, policy=a.policy, recipe=a.recipe, overrides=_ft_overrides(a), model=a.model)
    return 0


def _lr_find(a) -> int:
    from resforge import api
    api.lr_find(a.source, data=a.data, policy=a.policy, recipe=a.recipe, overrides=_ft_overrides(a),
                model=a.model, start=a.start_lr, end=a.end_lr, steps=a.steps, out=a.out)
    return 0


def _add_finetune(sub) -> None:
    f = sub.add_parser("finetune", help="fine-tune pretrained weights with a policy; writes a before/after report",
                       description="Start from a resforge run/checkpoint, a torchvision/timm ImageNet ResNet or an "
                                   "akamaster CIFAR ResNet; new head for the data's classes. Report rows: (a) prototype "
                                   "head, (b) linear probe, (c) the policy, on the same test split. Any config key can "
                                   "be overridden as key=value (finetune.bn=freeze-stats, finetune.input_size=128, ...).")
    f.add_argument("--from", dest="source", required=True, metavar="RUN_OR_WEIGHTS")
    f.add_argument("--policy", default=None, help="linear-probe | last-stages:K | stages:A,B | full | gradual | bitfit | lora "
                                                  "(default: the recipe's finetune.policy)")
    lr = sub.add_parser("lr-find", help="learning-rate range test: plot and suggested optim.lr",
                        description="Sweep the rate geometrically while training, record the loss, suggest a rate. "
                                    "With --from: for that fine-tuning policy's main phase; without: for the recipe's "
                                    "model from scratch.")
    lr.add_argument("--from", dest="source", default=None, metavar="RUN_OR_WEIGHTS")
    lr.add_argument("--policy", default=None)
    lr.add_argument("--start-lr", type=float, default=1e-6)
    lr.add_argument("--end-lr", type=float, default=1.0)
    lr.add_argument("--steps", type=int, default=100)
    lr.add_argument("--out", default=None, help="output folder (default: PROJECT/lr-find)")
    for q, fn in ((f, _finetune), (lr, _lr_find)):
        q.add_argument("--data", default=None, help="data source (.npz, folder, cifar10, ...)")
        q.add_argument("--recipe", default="finetune", help="recipe name or YAML path (default: finetune)")
        q.add_argument("--model", default=None, help="architecture, for third-party weights (checked for checkpoints)")
        for k in FT_SHORTCUTS:
            q.add_argument(f"--{k.replace('_', '-')}", dest=k, default=None, help=f"= {FT_SHORTCUTS[k]}")
        q.add_argument("overrides", nargs="*", metavar="key=value")
        q.set_defaults(fn=fn)


def _export(a) -> int:
    try:
        from resforge.export import export
        result = export(a.source, a.format, a.out, model_name=a.model, samples=a.samples)
    except ImportError as e:                      # optional extra missing: say which
        print(f"resforge: error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


def _serve(a) -> int:
    try:
        from resforge.serve import serve
        serve(a.source, host=a.host, port=a.port, backend=a.backend, model_name=a.model,
              max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, max_upload_bytes=int(a.max_upload_mb * 1e6),
              max_pixels=a.max_pixels, max_files=a.max_files, threads=a.threads, log_level=a.log_level)
    except ImportError as e:
        print(f"resforge: error: {e}", file=sys.stderr)
        return 2
    return 0


def _add_deploy(sub) -> None:
    x = sub.add_parser("export", help="export to ONNX or TorchScript (parity-checked against PyTorch)")
    x.add_argument("source", help="run folder, resforge checkpoint or weights file")
    x.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    x.add_argument("--out", default=None, help="output file (default: next to the weights, .onnx/.torchscript)")
    x.add_argument("--samples", nargs="+", default=None, metavar="PATH",
                   help="images for the parity check (default: the run's own held-out data)")
    x.add_argument("--model", default=None, help="architecture, for third-party weights")
    x.set_defaults(fn=_export)

    v = sub.add_parser("serve", help="HTTP inference service with a web page (needs resforge[serve])")
    v.add_argument("source", help="run folder, weights file, or an exported .onnx/.torchscript")
    v.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--backend", choices=["auto", "torch", "onnx", "torchscript"], default="auto",
                   help="auto: what the source is (weights -> torch, .onnx -> onnx)")
    v.add_argument("--model", default=None, help="architecture, for third-party weights")
    v.add_argument("--max-batch", type=int, default=32, help="micro-batch size limit (1 = no batching)")
    v.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill up")
    v.add_argument("--max-upload-mb", type=float, default=20.0, help="request body limit, in MB")
    v.add_argument("--max-pixels", type=int, default=40_000_000, help="per-image pixel limit (bomb guard)")
    v.add_argument("--max-files", type=int, default=64, help="images per request")
    v.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: one per core)")
    v.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="debug also logs every request")
    v.set_defaults(fn=_serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resforge", description="Train, fine-tune, evaluate and serve ResNets.")
    p.add_argument("--version", action="version", version=f"resforge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (default: the embedded digits recipe)",
                       description="Train from a recipe; any config key can be overridden as key=value "
                                   "(e.g. optim.lr=0.05 or lr=0.05). See `resforge recipes`.")
    t.add_argument("--recipe", default=None,
                   help="recipe name (configs/NAME.yaml) or YAML path; default: digits, or default with --data")
    for k in SHORTCUTS:
        t.add_argument(f"--{k.replace('_', '-')}", dest=k, default=None, help=f"= {SHORTCUTS[k]}")
    t.add_argument("--resume", default=None, metavar="RUN", help="continue an interrupted run folder")
    t.add_argument("overrides", nargs="*", metavar="key=value")
    t.set_defaults(fn=_train)

    e = sub.add_parser("eval", help="evaluate a run or weights file on a data split")
    e.add_argument("source", nargs="?", help="run folder, resforge checkpoint, or torchvision/timm/akamaster weights")
    e.add_argument("--weights", default=None, help="same as SOURCE")
    e.add_argument("--data", default=None, help="data source (default: the run's own)")
    e.add_argument("--model", default=None, help="architecture, for third-party weights (e.g. resnet56)")
    e.add_argument("--split", action="append", help="split(s) to evaluate (default test; repeatable)")
    e.add_argument("--tta", action="store_true", help="test-time augmentation: the views the network trained "
                   "with (mirror if it trained with flips, 1-px shifts if with translations)")
    e.add_argument("--batch-size", type=int, default=512)
    e.add_argument("--out", default=None, help="new report folder (default: RUN/eval/<weights>-<splits>[-tta]; "
                   "the run's own report is never replaced)")
    e.add_argument("--device", default="auto")
    e.add_argument("--data-root", default=None)
    e.add_argument("--download", action="store_true")
    e.set_defaults(fn=_eval)

    r = sub.add_parser("predict", help="predict classes of image files or folders")
    r.add_argument("source", help="run folder or weights file")
    r.add_argument("inputs", nargs="+", help="image files and/or folders")
    r.add_argument("--topk", type=int, default=5)
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--model", default=None)
    r.add_argument("--device", default="auto")
    r.add_argument("--out", default=None, help="write predictions to .csv or .json")
    r.add_argument("--workers", type=int, default=None, help="decoding threads (default: CPU cores, max 8)")
    r.set_defaults(fn=_predict)
    _add_deploy(sub)

    m = sub.add_parser("models", help="list the model registry")
    m.set_defaults(fn=_models)

    rc = sub.add_parser("recipes", help="list the named training recipes")
    rc.set_defaults(fn=_recipes)

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("scan", help="per-class counts, rejected files, duplicates and leaks")
    s.add_argument("source")
    s.add_argument("--image-size", type=int, default=None)
    s.add_argument("--channels", type=int, default=None)
    s.add_argument("--data-root", default=None)
    s.add_argument("--json", default=None, help="also save the report as JSON")
    s.set_defaults(fn=_scan)
    _add_experiment(sub)
    _add_finetune(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:
        # Expected user errors (bad config, bad data, bad weights): one clear line, no traceback.
        print(f"resforge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
