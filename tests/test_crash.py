"""Crash safety of training runs: resume after SIGKILL at any moment (checkpoint writes included),
a killed session's temporaries swept, metrics.csv with every epoch once, a full disk reported in
one sentence with the previous checkpoint intact, and broken run folders refused in one sentence."""
import csv
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import _cli

import resforge
from resforge.checkpoint import DiskFullError, save_state
from resforge.config import load_config
from resforge.runs import RunFolderError, sweep_temporaries

pytestmark = pytest.mark.usefixtures("one_thread")     # in-process runs: see conftest.one_thread
SRC = Path(__file__).parents[1] / "src"
TINY = ["data.image_size=8", "train.batch_size=64", "train.progress=false", "model.name=resnet20",
        "train.deterministic=true"]


def _env():
    # one thread: bit-identical reruns, and no OpenMP spinning against other jobs on a small CPU
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}


def _train(tmp_path, name, epochs=2):
    return resforge.train("digits", TINY + [f"train.epochs={epochs}", f"train.project={tmp_path}",
                                            f"train.name={name}", f"data.cache_dir={tmp_path / 'cache'}"])


def _epochs(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.csv").read_text().strip().splitlines()[1:]
    return [int(line.split(",")[0]) for line in lines]


CLOCK = ("epoch_seconds", "wall_seconds", "train_seconds")      # metrics.csv columns no two runs share


def _metrics_without_clock(text: str) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in CLOCK} for row in csv.DictReader(io.StringIO(text))]


def _temporaries(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


def _same_weights(a_dir: Path, b_dir: Path) -> bool:
    for tag in ("last", "best"):
        a = load_file(str(a_dir / "weights" / f"{tag}.safetensors"))
        b = load_file(str(b_dir / "weights" / f"{tag}.safetensors"))
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False
    return True


# ---------------------------------------------------------------- resume without a first state

def test_resume_of_a_run_killed_before_its_first_state_restarts_cleanly(tmp_path):
    """Killed in epoch 1 after metrics.csv got its row but before last.state.pt (or even splits.json)
    was written: the resume restarts from scratch, keeps epoch 1 once, sweeps the orphaned
    temporaries and ends where an uninterrupted run ends."""
    run = _train(tmp_path, "r")
    want_metrics, want_splits = (run.dir / "metrics.csv").read_text(), (run.dir / "splits.json").read_text()
    for f in ("weights/last.state.pt", "splits.json", "report.json"):
        (run.dir / f).unlink()
    (run.dir / "metrics.csv").write_text(want_metrics.splitlines()[0] + "\n" + want_metrics.splitlines()[1] + "\n")
    orphans = [run.dir / "weights" / ".last.state.pt.k3x_9qa1.tmp", run.dir / ".metrics.csv.4242.tmp",
               run.dir / "tmpab12cd34.tmp"]
    keep = [run.dir / "notes.tmp", run.dir / ".last.state.pt.tmp", run.dir / "weights" / "mine.k3x_9qa1.tmp"]
    for p in orphans + keep:
        p.write_bytes(b"x")
    resforge.train(resume=run.dir)
    got = (run.dir / "metrics.csv").read_text()                        # epochs 1, 2 once each
    assert _metrics_without_clock(got) == _metrics_without_clock(want_metrics) and len(got.splitlines()) == 3
    assert (run.dir / "splits.json").read_text() == want_splits           # made again, identical
    assert not any(p.exists() for p in orphans) and all(p.exists() for p in keep)


def test_sweep_touches_only_regular_files_named_like_resforge_temporaries(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / ".best.json.abcdefgh.tmp").mkdir()                         # a folder: left alone
    (tmp_path / "target").write_text("keep")
    (tmp_path / ".best.safetensors.a1b2c3d4.tmp").symlink_to(tmp_path / "target")
    (tmp_path / "weights" / ".best.json.abcdefgh.tmp").write_text("{")
    assert sweep_temporaries(tmp_path) == [tmp_path / "weights" / ".best.json.abcdefgh.tmp"]
    assert (tmp_path / "target").read_text() == "keep" and (tmp_path / ".best.json.abcdefgh.tmp").is_dir()


# ---------------------------------------------------------------- broken run folders

def test_resume_of_a_broken_run_folder_is_one_sentence(tmp_path):
    stub = tmp_path / "stub"
    stub.mkdir()                                       # killed between mkdir and config.json
    out = subprocess.run([sys.executable, "-m", "resforge.cli", "train", "--resume", str(stub)], env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"resforge: error: cannot resume {stub}: it has no config.json, so it is not a resforge run folder (or "
        "its run was killed before it started); pass the folder `resforge train` printed, or start a new run "
        "without --resume"]
    with pytest.raises(FileNotFoundError, match="nope: no such folder"):
        resforge.train(resume=tmp_path / "nope")
    (stub / "config.json").write_text('{"train": {"epochs": ')
    with pytest.raises(RunFolderError, match=r"config.json is unreadable or not a resforge config .*start a new run"):
        resforge.train(resume=stub)
    (stub / "config.json").write_text('{"train": {"epochz": 3}}')
    with pytest.raises(RunFolderError, match=r"config.json is unreadable or not a resforge config .*epochz"):
        resforge.train(resume=stub)
    (stub / "config.json").write_text(json.dumps(load_config("digits").to_dict()))
    save_state(stub / "weights" / "last.state.pt", {"epoch": 1})   # an epoch was saved ...
    (stub / "splits.json").write_text("[]")
    with pytest.raises(RunFolderError, match=r"splits.json: the split manifest must be an object.*cannot be resumed"):
        resforge.train(resume=stub)
    (stub / "splits.json").unlink()                   # ... so the splits it trained on are lost
    with pytest.raises(RunFolderError, match=r"splits.json is missing.*cannot be resumed"):
        resforge.train(resume=stub)


# ---------------------------------------------------------------- a full disk

def test_a_full_disk_while_saving_keeps_the_previous_file_and_says_so(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "weights").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    state = run / "weights" / "last.state.pt"
    save_state(state, {"epoch": 1})
    before = state.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("resforge.atomic.os.fsync", full)
    with pytest.raises(DiskFullError) as e:
        save_state(state, {"epoch": 2})
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert str(e.value).startswith(f"no space left on the device to write {state} (")
    assert "the previous last.state.pt is intact" in str(e.value) and f"--resume {run}`" in str(e.value)
    assert state.read_bytes() == before and _temporaries(tmp_path) == []
    with pytest.raises(DiskFullError, match=r"other\.bin was not created .* write to a folder on another disk"):
        save_state(tmp_path / "other.bin", {})
    assert not (tmp_path / "other.bin").exists() and _temporaries(tmp_path) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs (root only; skipped where the sandbox forbids mounts)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the injected-ENOSPC test covers the write path")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path) -> Path:
    filler, fd = disk / "filler", os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 20, 4096, 1):             # unbuffered: every byte that fits is written
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
def test_disk_full_during_training_stops_with_one_sentence_and_resumes(tmp_path, small_disk):
    args = ["train", "--recipe", "digits", "--project", str(small_disk), "--name", "r", *TINY, "train.epochs=3",
            "train.ema=0.9", f"data.cache_dir={tmp_path / 'cache'}"]
    p, run = _cli(args, _env()), small_disk / "r"
    state = run / "weights" / "last.state.pt"
    deadline = time.time() + 300
    while not state.is_file() and p.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    p.send_signal(signal.SIGSTOP)                      # epoch 1 is saved; fill the disk before epoch 2 saves
    try:
        assert state.is_file(), p.stdout.read() if p.poll() is not None else "epoch 1 never saved"
        saved = {f.name: f.read_bytes() for f in (run / "weights").iterdir()} | {
            "metrics.csv": (run / "metrics.csv").read_bytes()}
        filler = _fill(small_disk)
    finally:
        p.send_signal(signal.SIGCONT)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 3 and "Traceback" not in out, out          # 3: an operating-system error
    error = [line for line in out.splitlines() if line.startswith("resforge: error:")]
    assert len(error) == 1 and error[0].startswith(f"resforge: error: no space left on the device to write {run}/")
    assert "is intact and no half-written file is left" in error[0] and f"--resume {run}`" in error[0]
    now = {f.name: f.read_bytes() for f in (run / "weights").iterdir()} | {
        "metrics.csv": (run / "metrics.csv").read_bytes()}
    assert now == saved and _temporaries(run) == []   # the epoch-1 checkpoint, byte for byte
    filler.unlink()                                    # the remedy the sentence names
    resumed = _cli(["train", "--resume", str(run)], _env())
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    assert _epochs(run) == [1, 2, 3] and _temporaries(run) == []


# ---------------------------------------------------------------- SIGKILL at random moments

N_KILLS = 12
EPOCHS = 4


def _wait_for(pred, p, timeout):
    deadline = time.time() + timeout
    while p.poll() is None and time.time() < deadline:
        if pred():
            return True
        time.sleep(0.0005)
    return False


def _kill(p, run: Path, rng: random.Random, mode: str, first: bool, startup: float, rest: float) -> str | None:
    """Kill `p` at a moment of the kind `mode` says; -> what it waited for, or None if `p` ended first.

    mode "tmp": the moment a temporary of a chosen target file appears (mid-write of a checkpoint,
    the resume state, metrics.csv); "time": a random time in the run (for a fresh run, after its
    config.json exists: killed before that there is nothing to resume, test_resume_of_a_broken_...)."""
    if mode == "tmp":
        target = rng.choice(["last.state.pt", "last.safetensors", "best.safetensors", "best.json", "metrics.csv"])
        prefix = f".{target}."
        folders = (run, run / "weights")

        def tmp_seen():
            for d in folders:
                try:
                    if any(n.startswith(prefix) and n.endswith(".tmp") for n in os.listdir(d)):
                        return True
                except FileNotFoundError:
                    pass
            return False
        what = f"tmp of {target}"
        hit = _wait_for(tmp_seen, p, 120)
    else:
        if first:
            hit = _wait_for(lambda: (run / "splits.json").is_file(), p, 120)
            delay = rng.uniform(0, rest)
        else:
            hit, delay = True, rng.uniform(0.5 * startup, startup + rest)
        what = f"{delay:.2f}s"
        hit = hit and not _wait_for(lambda: False, p, delay)
    if not hit or p.poll() is not None:
        p.wait()
        return None
    p.send_signal(signal.SIGKILL)
    p.wait()
    return what


def _trials(tmp_path: Path, prefix: str, seed: int, n_kills: int, common: list, startup: float, rest: float):
    """Run folders killed `n_kills` times in all, each resumed after every kill (a fresh folder
    when one finishes before its kill), the last resumed to completion. -> (folders, log, orphans)."""
    rng, kills, orphans, folders, log = random.Random(seed), 0, 0, [], []
    run, done = None, True
    while kills < n_kills:
        first = done
        if first:
            run, done = tmp_path / f"{prefix}{len(folders)}", False
            folders.append(run)
        p = _cli(common + ["--name", run.name] if first else ["train", "--resume", str(run)], _env())
        what = _kill(p, run, rng, "tmp" if kills % 3 == 0 else "time", first, startup, rest)
        if what is None:                               # it finished before the chosen moment
            assert p.returncode == 0, p.stdout.read()
            log.append(f"{run.name}: finished before the kill")
            done = True
            continue
        kills += 1
        left = _temporaries(run)
        orphans += len(left)
        saved = _epochs(run) if (run / "metrics.csv").is_file() else []
        log.append(f"{run.name}: killed at {what}, epochs in metrics.csv {saved}, temporaries {[t.name for t in left]}")
    if not done:
        p = _cli(["train", "--resume", str(run)], _env())
        assert p.wait(timeout=300) == 0, p.stdout.read() + "\n" + "\n".join(log)
    return folders, log, orphans


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path):
    common = ["train", "--recipe", "digits", "--project", str(tmp_path), *TINY, f"train.epochs={EPOCHS}",
              "train.ema=0.9", "model.drop_rate=0.1", f"data.cache_dir={tmp_path / 'cache'}"]
    t0 = time.time()
    ref = _cli(common + ["--name", "ref"], _env())
    assert _wait_for(lambda: (tmp_path / "ref" / "splits.json").is_file(), ref, 300)
    startup = time.time() - t0
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    rest = time.time() - t0 - startup                  # training + evaluation + report of the reference
    # two independent series side by side (single-threaded processes: twice the throughput on 2 cores)
    with ThreadPoolExecutor(2) as pool:
        series = list(pool.map(lambda i: _trials(tmp_path, f"trial{i}-", 20261202 + i, N_KILLS // 2, common,
                                                 startup, rest), range(2)))
    folders = [f for s in series for f in s[0]]
    log = [line for s in series for line in s[1]]
    for run in folders:
        assert _metrics_without_clock((run / "metrics.csv").read_text()) == _metrics_without_clock(
            (tmp_path / "ref" / "metrics.csv").read_text()), log
        assert _epochs(run) == list(range(1, EPOCHS + 1))
        assert _same_weights(tmp_path / "ref", run), (run, log)
        assert _temporaries(run) == [], (run, log)
    assert sum(s[2] for s in series) >= 1, log        # kills landed mid-write, and the resumes swept up
    print(f"reference: startup {startup:.1f}s + {rest:.1f}s", *log, sep="\n")
