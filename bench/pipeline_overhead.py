"""What resforge's pipeline adds to the bare compute of every recipe network (issue 18, part 5).

For each recipe: the model's bare training step (forward + backward + optimiser on one synthetic
batch already in memory) and resforge's real step (the recipe's TensorBatches over real images,
Augmenter, train_one_epoch, the Updater with its optimiser, schedule, lookahead/EMA/probes),
same model, batch size, threads, precision and layout, alternated in one process (A B B A: a
busy CPU drifts, alternation cancels most of it), warm-up steps excluded. The ratio is the
median round's resforge seconds per image / the bare step's: 1.25 means the pipeline adds 25%.

    python bench/pipeline_overhead.py --data ../shared/data/cifar-10-binary.tar.xz \\
        --imagenette ../shared/data/imagenette-128.tar [--seconds 4] [--rounds 4] [--json out.json]

--imagenette takes the extracted folder or the .tar (extracted once into the temporary folder,
$TMPDIR/resforge-bench-imagenette). Without it the pretrain-imagenette row is skipped. Each measurement
round runs at least 1 step and there are at least 2 rounds: a recipe whose step outlasts
--seconds / 2 (ResNet-18, airbench94 at batch 1024) runs longer than asked.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from resforge.atomic import atomic_write_text
from resforge.bench import pipeline_overhead

# Every recipe that trains a network of its own, once per (network, batch, input, augmentation):
# cifar10-fast-short, he2016-cifar10-short and default repeat a row below with another schedule.
RECIPES = ["digits", "cifar10-fast", "cifar10-resnet20", "cifar10-resnet56", "cifar10-resnet18",
           "he2016-cifar10", "pretrain-imagenette"]
CIFAR = {"cifar10-fast", "cifar10-fast-short", "cifar10-resnet20", "cifar10-resnet56", "cifar10-resnet18",
         "he2016-cifar10", "he2016-cifar10-short"}


def imagenette_folder(path: str | None) -> Path | None:
    """The imagenette folder: given, or extracted from the given .tar into a temporary folder."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        return p
    if not p.is_file():
        sys.exit(f"pipeline_overhead: --imagenette {p} not found: pass the imagenette-128 folder or its .tar")
    out = Path(tempfile.gettempdir()) / "resforge-bench-imagenette"
    folder = out / "imagenette-128"
    if not folder.is_dir():
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(p) as tar:
            tar.extractall(out, filter="data")
    return folder


def overrides_for(recipe: str, args, imagenette: Path | None) -> list[str] | None:
    out = ["train.progress=false"] + ([f"train.threads={args.threads}"] if args.threads else [])
    if args.cache_dir:
        out.append(f"data.cache_dir={args.cache_dir}")
    if recipe in CIFAR:
        return out + [f"data.source={args.data}"]
    if recipe == "pretrain-imagenette":
        return None if imagenette is None else out + [f"data.source={imagenette}"]
    return out


def main(argv=None) -> int:
    shared = Path(os.environ.get("RESFORGE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(shared / "cifar-10-binary.tar.xz"), help="CIFAR-10 archive or folder")
    p.add_argument("--imagenette", default=str(shared / "imagenette-128.tar") if (shared / "imagenette-128.tar").is_file()
                   else None, help="imagenette-128 folder or .tar (default: the shared copy if present)")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma list of recipe names")
    p.add_argument("--seconds", type=float, default=4.0,
                   help="wall seconds of steps per kind (bare, resforge) and recipe; at least 1 step per round")
    p.add_argument("--rounds", type=int, default=4,
                   help="at most this many bare/resforge alternations (A B B A ...); 2 when a step outlasts "
                        "--seconds / 2")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: auto, as a run would)")
    p.add_argument("--cache-dir", default=None, help="decoded-data cache (default: RESFORGE_CACHE)")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    imagenette = imagenette_folder(args.imagenette)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores", flush=True)
    print(f"{'recipe':<20} {'model':<11} {'batch':>5} {'input':<9} {'bare img/s':>10} {'resforge img/s':>14} "
          f"{'ratio':>6}  runtime, load", flush=True)
    rows, t0 = [], time.perf_counter()
    for recipe in args.recipes.split(","):
        ov = overrides_for(recipe, args, imagenette)
        if ov is None:
            print(f"{recipe:<20} skipped: no --imagenette data", flush=True)
            continue
        r = pipeline_overhead(recipe, ov, seconds=args.seconds, rounds=args.rounds)
        rows.append({"recipe": recipe, **r})
        size = "x".join(map(str, r["input_size"]))
        print(f"{recipe:<20} {r['model']:<11} {r['batch_size']:>5} {size:<9} {r['bare']['images_per_s']:>10.1f} "
              f"{r['resforge']['images_per_s']:>14.1f} {r['pipeline_overhead']:>5.3f}x  {r['runtime']}, "
              f"load {r['load'][0]:.2f}", flush=True)
    print(f"{time.perf_counter() - t0:.0f} s; ratio = resforge seconds per image / bare (1.25 = the pipeline adds 25%)")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
