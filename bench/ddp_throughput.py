"""Training throughput of one process with T threads against N processes with T/N threads each
(DistributedDataParallel over gloo, through `resforge train --nproc N`), on this machine, side by side.

    python bench/ddp_throughput.py                              # embedded digits, ResNet-20, 16 px
    python bench/ddp_throughput.py --data cifar10 --image-size 32 --train-fraction 0.1
    python bench/ddp_throughput.py --nproc 2 --threads 2 --repeats 3

Both runs train the same recipe with the same global batch (train.batch_size is the global batch:
each of N processes takes batch_size / N a step), so they do the same work; the figure is the
training-phase images/s of the epoch lines (evaluation excluded), median over epochs 2..E (the
first one warms up), median over --repeats. Prints the load average before each run: on a CPU this
small a second process competes with anything else running, so measure on an idle machine.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time


def run(nproc: int, threads: int, args, project: str) -> tuple[float, float]:
    """(training images/s, wall seconds) of one `resforge train`."""
    cmd = [sys.executable, "-m", "resforge", "train", "--project", project, "train.progress=false",
           f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", f"model.name={args.model}",
           "eval.splits=[val]", "train.bn_recalibrate=never"]
    if args.data != "digits":
        cmd[4:4] = ["--data", args.data]          # options before the key=value list (argparse)
        cmd.append(f"data.image_size={args.image_size}")
        if args.data_root:
            cmd.append(f"data.data_root={args.data_root}")
    if args.train_fraction:
        cmd.append(f"data.train_fraction={args.train_fraction}")
    env = {**os.environ}
    if nproc > 1:
        cmd[4:4] = ["--nproc", str(nproc)]
        env["OMP_NUM_THREADS"] = str(threads)
        cmd.append(f"train.threads={threads}")
    else:
        cmd.append(f"train.threads={threads}")
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if out.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    rates = [float(m) for m in re.findall(r"^epoch \d+/\d+ .* (\d+) img/s$", out.stdout, re.M)]
    if not rates:
        sys.exit(f"no epoch lines in the output of {' '.join(cmd)}:\n{out.stdout[-2000:]}")
    return statistics.median(rates[1:] or rates), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits")
    p.add_argument("--data-root", default=os.environ.get("RESFORGE_SHARED_DATA"))
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--train-fraction", type=float, default=None)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="threads in all")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isa = "avx512_bf16" if "avx512_bf16" in flags else "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "?"
    print(f"{args.model} on {args.data}, global batch {args.batch_size}, {args.epochs} epochs; {args.threads} "
          f"threads in all; CPU {isa}, {os.cpu_count()} logical CPUs")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for nproc in (1, args.nproc):
                threads = max(1, args.threads // nproc)
                load = os.getloadavg()[0]
                rate, wall = run(nproc, threads, args, f"{tmp}/{nproc}-{r}")
                rows.setdefault(nproc, []).append(rate)
                print(f"  {nproc} process{'es' * (nproc > 1)} x {threads} thread{'s' * (threads > 1)}: "
                      f"{rate:6.0f} img/s (training), whole command {wall:5.1f} s, load before {load:.2f}")
    one, many = statistics.median(rows[1]), statistics.median(rows[args.nproc])
    print(f"median: 1 x {args.threads} threads {one:.0f} img/s; {args.nproc} x {max(1, args.threads // args.nproc)} "
          f"{many:.0f} img/s; ratio {many / one:.2f} ({'processes' if many > one else 'threads'} win)")


if __name__ == "__main__":
    main()
