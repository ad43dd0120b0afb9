"""Model versions: every update of a deployed model is a new, immutable folder under its run.

    RUN/                          the original training run (untouched by updates)
    RUN/versions/v1/              the run itself, registered by the first update (or fewshot)
    RUN/versions/vN/
        weights/best.safetensors  the weights, written by checkpoint.save_checkpoint
        weights/best.json         its sidecar (weights_sha256, classes, preprocessing, "continual")
        version.json              the record (below), with the sha256 of every other file
        data/dK.json              split manifest of every data set seen so far (K = 1, 2, ...)
        buffer.safetensors        the replay buffer (continual/buffer.py), when the version has one
        report.json, report.md, *.png, metrics.csv   the update report (continual/report.py)

A version folder looks like a run folder to resolve_weights (weights/best.safetensors), so
eval/predict/export/serve take `RUN/versions/v3` or `RUN@v3` (checkpoint.resolve_weights).

version.json:
    format, format_version, version (N), parent (N-1 or null), lineage (sha256 of the root
    run's weights file: every version descending from one trained run shares it), created (UTC),
    class_names (head order), method ({"name": ...} and its settings), config (the resolved
    RunConfig of the update), data ([{id, source, data (config section), fingerprint,
    class_names, head_index, manifest, images, version}] for every data set seen so far),
    images_seen, metrics (headline figures), accuracy ({data id: {top1, n, per_class}} on the test
    split of every data set the version could evaluate), files ({relative path: sha256}),
    record_sha256 (sha256 of the canonical JSON of everything above: a hand edit of version.json
    is caught too).

Writing is atomic: a version is built in RUN/versions/.vN.tmp-XXXX and renamed to vN only when
complete, so a SIGKILL leaves either no vN or a whole one; the next write removes stale
temporaries. Versions are never modified after the rename.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

FORMAT = "resforge-version"
FORMAT_VERSION = 1
RECORD = "version.json"
WEIGHTS = Path("weights") / "best.safetensors"
BUFFER = "buffer.safetensors"
_VERSION_DIR = re.compile(r"v([1-9][0-9]{0,5})")
_TEMP_DIR = re.compile(r"\.v[0-9]+\.tmp-[A-Za-z0-9_]+")


class VersionError(ValueError):
    """A model version that is missing, damaged, edited by hand or of another lineage."""


@dataclass(frozen=True)
class Version:
    dir: Path                  # RUN/versions/vN
    record: dict               # version.json, verified

    @property
    def number(self) -> int:
        return self.record["version"]

    @property
    def run(self) -> Path:
        return self.dir.parent.parent

    @property
    def weights(self) -> Path:
        return self.dir / WEIGHTS

    @property
    def lineage(self) -> str:
        return self.record["lineage"]

    @property
    def parent(self) -> int | None:
        return self.record["parent"]

    @property
    def class_names(self) -> list[str]:
        return list(self.record["class_names"])

    @property
    def data(self) -> list[dict]:
        return list(self.record["data"])

    @property
    def buffer(self) -> Path | None:
        p = self.dir / BUFFER
        return p if BUFFER in self.record["files"] else None

    @property
    def name(self) -> str:
        return f"v{self.number}"


# ---------------------------------------------------------------- hashing

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _record_sha(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _folder_files(folder: Path) -> dict[str, str]:
    """{relative posix path: sha256} of every regular file under folder, version.json excluded."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != RECORD:
            out[rel] = file_sha256(p)
    return out


# ---------------------------------------------------------------- reading

def versions_dir(run: str | Path) -> Path:
    return Path(run) / "versions"


def version_numbers(run: str | Path) -> list[int]:
    """Numbers of the committed version folders of a run, ascending (temporaries ignored)."""
    root = versions_dir(run)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _VERSION_DIR.fullmatch(p.name)) and p.is_dir())


def load_version(path: str | Path) -> Version:
    """RUN/versions/vN -> its Version, after checking version.json's fields and the sha256 of
    every file it lists; anything edited, missing or malformed is one VersionError naming the file."""
    folder = Path(path)
    rec_path = folder / RECORD
    if not rec_path.is_file():
        raise VersionError(f"{folder} is not a model version: it has no {RECORD} (versions are made by "
                           "`resforge update`; list them with `resforge versions RUN`)")
    try:
        record = json.loads(rec_path.read_bytes())
    except (ValueError, RecursionError, OSError) as e:
        raise VersionError(f"{rec_path} is not readable JSON ({str(e)[:120]}): the version is damaged; "
                           "use another version of the run") from None
    _check_record(record, rec_path, folder)
    if record.get("record_sha256") != _record_sha(record):
        raise VersionError(f"{rec_path} was edited by hand (its record_sha256 no longer matches its content): "
                           "versions are immutable; use another version, or update again from an intact one")
    for rel, want in record["files"].items():
        p = folder / rel
        if not _inside(folder, p) or not p.is_file():
            raise VersionError(f"{p} is missing from version {folder.name} (listed in {RECORD}): the version "
                               "is damaged; use another version of the run")
        if file_sha256(p) != want:
            raise VersionError(f"{p} was changed after version {folder.name} was written (sha256 differs from "
                               f"{RECORD}): versions are immutable; use another version, or update again")
    if WEIGHTS.as_posix() not in record["files"]:
        raise VersionError(f"{rec_path} lists no {WEIGHTS.as_posix()}: the version is damaged")
    return Version(folder, record)


def _inside(folder: Path, p: Path) -> bool:
    try:
        p.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _check_record(r, rec_path: Path, folder: Path) -> None:
    def bad(field: str, problem: str):
        raise VersionError(f"{rec_path}: {field} {problem}; the version is damaged or not a resforge version")

    if not isinstance(r, dict) or r.get("format") != FORMAT:
        bad("format", f"is not {FORMAT!r}")
    if not isinstance(r.get("format_version"), int) or r["format_version"] > FORMAT_VERSION:
        bad("format_version", f"is {r.get('format_version')!r}: written by a newer resforge? (this one reads "
                              f"{FORMAT_VERSION})")
    n = r.get("version")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        bad("version", f"must be a positive integer, found {n!r}")
    m = _VERSION_DIR.fullmatch(folder.name)
    if m and int(m.group(1)) != n:
        bad("version", f"is {n} but the folder is {folder.name}")
    p = r.get("parent")
    if not (p is None or (isinstance(p, int) and not isinstance(p, bool) and 1 <= p < n)):
        bad("parent", f"must be null or a version below {n}, found {p!r}")
    if not (isinstance(r.get("lineage"), str) and re.fullmatch(r"[0-9a-f]{64}", r["lineage"])):
        bad("lineage", "must be 64 hex digits")
    names = r.get("class_names")
    if not (isinstance(names, list) and names and all(isinstance(x, str) for x in names)
            and len(set(names)) == len(names)):
        bad("class_names", "must be a non-empty list of distinct strings")
    if not isinstance(r.get("method"), dict) or not isinstance(r["method"].get("name"), str):
        bad("method", "must be an object with a name")
    for key in ("config", "metrics", "accuracy", "files"):
        if not isinstance(r.get(key), dict):
            bad(key, "must be an object")
    if not all(isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)
               for k, v in r["files"].items()):
        bad("files", "must map file names to sha256 digests")
    data = r.get("data")
    if not isinstance(data, list):
        bad("data", "must be a list")
    k = len(names)
    for i, d in enumerate(data):
        if not isinstance(d, dict) or not isinstance(d.get("id"), str) or not isinstance(d.get("source"), str):
            bad(f"data[{i}]", "must be an object with an id and a source")
        hi = d.get("head_index")
        if not (isinstance(hi, list) and all(isinstance(j, int) and not isinstance(j, bool) and 0 <= j < k
                                             for j in hi)):
            bad(f"data[{i}].head_index", f"must list head rows in 0..{k - 1}")
        if not isinstance(d.get("class_names"), list) or len(d["class_names"]) != len(hi):
            bad(f"data[{i}].class_names", "must name one class per head_index entry")
        man = d.get("manifest")
        if man is not None and not (isinstance(man, str) and man in r["files"]):
            bad(f"data[{i}].manifest", f"must name a file listed in files, found {man!r}")
    seen = r.get("images_seen")
    if not isinstance(seen, int) or isinstance(seen, bool) or seen < 0:
        bad("images_seen", f"must be a count, found {seen!r}")


def list_versions(run: str | Path) -> list[Version]:
    """Every version of a run, oldest first, each verified (a damaged one raises VersionError)."""
    return [load_version(versions_dir(run) / f"v{n}") for n in version_numbers(run)]


def chain(version: Version) -> list[Version]:
    """The lineage from the first version to `version` (following parents), oldest first."""
    out, v = [version], version
    while v.parent is not None:
        v = load_version(versions_dir(v.run) / f"v{v.parent}")
        if v.lineage != version.lineage:
            raise VersionError(f"{v.dir} belongs to lineage {v.lineage[:12]}, not {version.lineage[:12]} of "
                               f"{version.dir}: the run folder mixes versions of different models")
        out.append(v)
    return out[::-1]


def _version_ref():
    """(the RUN@vN pattern, version_folder): the weights resolver owns both, since eval/predict/
    export/serve read versions through it."""
    from resforge.weightfile import VERSION_REF, version_folder   # lazy: weightfile reads versions too
    return VERSION_REF, version_folder


def split_model_arg(model: str | Path) -> tuple[Path, int | None]:
    """'RUN@v3' / 'RUN@latest' / 'RUN/versions/v3' -> (RUN, 3 or the newest number); anything
    else -> (path, None)."""
    try:
        folder = _version_ref()[1](model)
    except FileNotFoundError as e:
        raise VersionError(str(e)) from None
    p = folder or Path(model)
    vm = _VERSION_DIR.fullmatch(p.name)
    if vm and p.parent.name == "versions":
        return p.parent.parent, int(vm.group(1))
    return p, None


def version_path(model: str | Path) -> Path | None:
    """The version folder that a MODEL argument names (RUN@v3, RUN@latest, RUN/versions/v3), or None
    when it names no version (a plain run folder or weights file)."""
    run, which = split_model_arg(model)
    if which is None:
        return None
    folder = versions_dir(run) / f"v{which}"
    if not folder.is_dir():
        have = ", ".join(f"v{n}" for n in version_numbers(run)) or "none"
        raise VersionError(f"{run} has no version v{which} (versions: {have}); list them with "
                           f"`resforge versions {run}`")
    return folder


def resolve_model(model: str | Path) -> tuple[Path, Version | None]:
    """A MODEL argument -> (run folder, version). A run folder gives its latest version, or None
    when it has none yet (the caller registers the run as v1: register_root; so does RUN@v1 or
    RUN@latest of such a run); RUN@vN and RUN/versions/vN give that version."""
    m = _version_ref()[0].fullmatch(str(model))
    if m and m.group(2) in ("v1", "latest") and not version_numbers(m.group(1)) and run_weights(m.group(1)):
        return Path(m.group(1)), None          # RUN@v1 of a run not registered yet: the run itself is v1
    folder = version_path(model)
    if folder is not None:
        return folder.parent.parent, load_version(folder)
    run = Path(model)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder or model version (pass a run folder of "
                                "`resforge train`/`finetune`, RUN@vN or RUN/versions/vN)")
    numbers = version_numbers(run)
    if numbers:
        return run, load_version(versions_dir(run) / f"v{numbers[-1]}")
    if run_weights(run) is None:
        raise FileNotFoundError(f"{run} has no weights/best.safetensors or weights/last.safetensors: pass the "
                                "folder of a finished resforge run (or one of its versions)")
    return run, None


# ---------------------------------------------------------------- writing

def next_number(run: str | Path) -> int:
    """The number the next version of `run` will get (what write_version assigns, barring a race)."""
    numbers = version_numbers(run)
    return numbers[-1] + 1 if numbers else 1


def sweep_stale(run: str | Path) -> list[Path]:
    """Remove temporary version folders a killed update left (RUN/versions/.vN.tmp-*)."""
    root, gone = versions_dir(run), []
    if root.is_dir():
        for p in root.iterdir():
            if _TEMP_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


def write_version(run: str | Path, *, parent: Version | None, lineage: str | None = None,
                  build: Callable[[Path], dict]) -> Version:
    """Build a new version atomically and return it, verified.

    build(tmp) writes the version's files into the temporary folder `tmp` (weights/best.* with
    checkpoint.save_checkpoint, buffer.safetensors, data/*.json, the report, ...) and returns the
    record's fields: class_names, method, config, data, images_seen, metrics, accuracy (and any
    extra JSON fields). This function adds format, version, parent, lineage (the parent's, or
    `lineage` for a root), created, files and record_sha256, then renames tmp to vN.
    Any exception (or a kill) leaves no vN; temporaries of killed writes are swept first."""
    run = Path(run)
    root = versions_dir(run)
    root.mkdir(parents=True, exist_ok=True)
    sweep_stale(run)
    numbers = version_numbers(run)
    n = (numbers[-1] + 1) if numbers else 1
    if parent is None and n != 1:
        raise VersionError(f"{run} already has versions (v{numbers[-1]}): a new root version cannot be added; "
                           "update from one of them")
    if parent is not None and parent.run.resolve() != run.resolve():
        raise VersionError(f"version {parent.dir} belongs to {parent.run}, not {run}")
    lineage = parent.lineage if parent is not None else lineage
    if not (isinstance(lineage, str) and re.fullmatch(r"[0-9a-f]{64}", lineage)):
        raise VersionError("a root version needs a lineage id (sha256 of the root weights)")
    tmp = Path(tempfile.mkdtemp(prefix=f".v{n}.tmp-", dir=root))
    try:
        fields = build(tmp)
        record = {"format": FORMAT, "format_version": FORMAT_VERSION, "version": n,
                  "parent": parent.number if parent is not None else None, "lineage": lineage,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "images_seen": 0, "metrics": {}, "accuracy": {}, **fields}
        record["files"] = _folder_files(tmp)
        record["record_sha256"] = _record_sha(record)
        _check_record(record, tmp / RECORD, tmp)
        _write_json(tmp / RECORD, record)
        _fsync_dir(tmp)
        final = root / f"v{n}"
        try:
            os.rename(tmp, final)        # atomic; fails if another update committed vN meanwhile
        except OSError:
            raise VersionError(f"{final} appeared while this update ran (another update of the same run?): "
                               "nothing was written; run the command again") from None
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_version(final)


def _write_json(path: Path, obj) -> None:
    from resforge.atomic import atomic_write_text
    atomic_write_text(path, json.dumps(obj, indent=1, default=_plain))


def _plain(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the root version (the run itself)

def run_weights(run: str | Path) -> Path | None:
    """The weights of a training run: weights/best.safetensors, else weights/last.safetensors (a
    run without validation keeps only its last epoch); None when it has neither."""
    for tag in ("best", "last"):
        p = Path(run) / "weights" / f"{tag}.safetensors"
        if p.is_file():
            return p
    return None


def root_lineage(run: str | Path) -> str:
    """The lineage id of a run: the sha256 of its weights file (as its sidecar records it)."""
    w = run_weights(run)
    sidecar = w.with_suffix(".json")
    try:
        sha = json.loads(sidecar.read_text()).get("weights_sha256")
    except (OSError, ValueError, AttributeError):
        sha = None
    return sha if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) else file_sha256(w)


def register_root(run: str | Path, *, accuracy: dict | None = None, metrics: dict | None = None) -> Version:
    """RUN/versions/v1 from the run itself: a copy of its weights and sidecar (verified first), its
    config, and its data set (source, fingerprint, split manifest) as data set "d1". accuracy /
    metrics: what the caller measured on d1's test split ({"d1": {"top1", "n", "per_class"}}); by
    default the run's report.json test figures. Returns v1 (or the existing v1)."""
    run = Path(run)
    if version_numbers(run):
        return load_version(versions_dir(run) / f"v{version_numbers(run)[0]}")
    from resforge.checkpoint import read_meta
    weights = run_weights(run)
    if weights is None:
        raise VersionError(f"{run} has no weights/best.safetensors or weights/last.safetensors to register as v1")
    meta = read_meta(weights)               # verifies the pair (sha256) and every sidecar field
    if not meta:
        raise VersionError(f"{weights} has no resforge sidecar: only resforge runs can be versioned")
    cfg = _json_file(run / "config.json")
    manifest_path = run / "splits.json"
    names = list(meta["class_names"])
    data_cfg = dict(cfg.get("data", {})) if isinstance(cfg.get("data"), dict) else {}
    data_cfg["manifest"] = None
    entry = {"id": "d1", "source": str(data_cfg.get("source", meta.get("data", {}).get("source", "?"))),
             "data": data_cfg, "fingerprint": meta.get("data", {}).get("fingerprint"),
             "class_names": names, "head_index": list(range(len(names))), "manifest": None,
             "images": {}, "version": 1}
    if accuracy is None:
        accuracy = _report_accuracy(run, names)

    def build(tmp: Path) -> dict:
        (tmp / "weights").mkdir()
        shutil.copyfile(weights, tmp / WEIGHTS)
        shutil.copyfile(weights.with_suffix(".json"), tmp / WEIGHTS.with_suffix(".json"))
        if manifest_path.is_file():
            from resforge.data.splits import load_manifest
            man = load_manifest(manifest_path)          # validated (hash)
            (tmp / "data").mkdir()
            shutil.copyfile(manifest_path, tmp / "data" / "d1.json")
            entry["manifest"] = "data/d1.json"
            entry["images"] = {s: len(ids) for s, ids in man["splits"].items()}
        top = accuracy.get("d1", {}).get("top1")
        return {"class_names": names, "method": {"name": "train"}, "config": cfg,
                "data": [entry], "images_seen": int(entry["images"].get("train", 0)),
                "metrics": metrics if metrics is not None else ({"top1": top} if top is not None else {}),
                "accuracy": accuracy}
    return write_version(run, parent=None, lineage=root_lineage(run), build=build)


def _json_file(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _report_accuracy(run: Path, names: list[str]) -> dict:
    """{"d1": {top1, n, per_class}} from the run's report.json test split, {} when absent."""
    test = _json_file(run / "report.json").get("test")
    if not isinstance(test, dict) or not isinstance(test.get("top1"), (int, float)):
        return {}
    per = test.get("per_class") if isinstance(test.get("per_class"), list) else []
    recall = {r.get("name"): r.get("recall") for r in per if isinstance(r, dict)}
    support = {r.get("name"): r.get("support") for r in per if isinstance(r, dict)}
    per_class = {c: float(recall[c]) for c in names if isinstance(recall.get(c), (int, float))}
    n = test.get("n") if isinstance(test.get("n"), int) else 0
    return {"d1": {"top1": float(test["top1"]), "n": n, "per_class": per_class,
                   "support": {c: int(support[c]) for c in per_class if isinstance(support.get(c), int)}}}
