"""`resforge` command line: a thin layer over resforge.api (one function per subcommand).

    resforge train [--recipe NAME|FILE] [--data SRC] [--model NAME] [key=value ...]
    resforge train --resume runs/NAME
    resforge eval RUN_OR_WEIGHTS [--data SRC] [--model NAME] [--split test] [--tta]
    resforge predict RUN_OR_WEIGHTS FILES_OR_FOLDERS... [--topk 5] [--out preds.csv]
    resforge models
    resforge data scan SRC
    resforge recipes
"""
from __future__ import annotations

import argparse
import json
import sys

from resforge import __version__

SHORTCUTS = {"data": "data.source", "model": "model.name", "epochs": "train.epochs",
             "batch_size": "train.batch_size", "lr": "optim.lr", "device": "train.device",
             "name": "train.name", "project": "train.project", "seed": "train.seed",
             "pretrained": "model.pretrained"}


def _train(a) -> int:
    from resforge import api
    overrides = [f"{SHORTCUTS[k]}={v}" for k, v in vars(a).items() if k in SHORTCUTS and v is not None]
    overrides += a.overrides
    api.train(a.recipe if not a.resume else None, overrides, resume=a.resume)
    return 0


def _eval(a) -> int:
    from resforge import api
    api.evaluate(a.source, data=a.data, splits=a.split or ["test"], tta=a.tta, model=a.model,
                 batch_size=a.batch_size, out_dir=a.out, device=a.device, data_root=a.data_root,
                 download=a.download)
    return 0


def _predict(a) -> int:
    from resforge.infer import format_predictions, predict, save_predictions
    rows = predict(a.source, a.inputs, topk=a.topk, batch_size=a.batch_size,
                   device=None if a.device == "auto" else a.device, model_name=a.model)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resforge", description="Train, fine-tune, evaluate and serve ResNets.")
    p.add_argument("--version", action="version", version=f"resforge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (default: the embedded digits recipe)",
                       description="Train from a recipe; any config key can be overridden as key=value "
                                   "(e.g. optim.lr=0.05 or lr=0.05). See `resforge recipes`.")
    t.add_argument("--recipe", default="digits", help="recipe name (configs/NAME.yaml) or YAML path")
    for k in SHORTCUTS:
        t.add_argument(f"--{k.replace('_', '-')}", dest=k, default=None, help=f"= {SHORTCUTS[k]}")
    t.add_argument("--resume", default=None, metavar="RUN", help="continue an interrupted run folder")
    t.add_argument("overrides", nargs="*", metavar="key=value")
    t.set_defaults(fn=_train)

    e = sub.add_parser("eval", help="evaluate a run or weights file on a data split")
    e.add_argument("source", help="run folder, resforge checkpoint, or torchvision/timm/akamaster weights")
    e.add_argument("--data", default=None, help="data source (default: the run's own)")
    e.add_argument("--model", default=None, help="architecture, for third-party weights (e.g. resnet56)")
    e.add_argument("--split", action="append", help="split(s) to evaluate (default test; repeatable)")
    e.add_argument("--tta", action="store_true", help="test-time augmentation (flip + shifts)")
    e.add_argument("--batch-size", type=int, default=512)
    e.add_argument("--out", default=None, help="report folder (default: the run folder)")
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
    r.set_defaults(fn=_predict)

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
