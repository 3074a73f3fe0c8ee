"""The `cascade` command line. Thin: it parses arguments, sets up logging and calls the library."""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

DEFAULT_CONFIG = Path("pipelines") / "default.toml"

EPILOG_RUN = """examples:
  cascade run                                   # pipelines/default.toml on the embedded synthetic world
  cascade run pipelines/tiny.toml               # a one-minute run
  cascade run --data custom:examples/own_logs/mapping.toml     # your own logs (runs/own-logs/)
  cascade run pipelines/movielens.toml --set data.path=path/to/ml-100k
  cascade run --data kuairand:path/to/KuaiRand-Pure/data
  cascade run --set teacher.model.backbone=deepfm --set run.name=deepfm
  cascade run --force teacher                   # redo one step (and whatever its change affects)
  cascade run --set replay.k=20 --update        # change an existing run in place (else refused, naming the keys)
"""
#: --set keys `cascade replay` / `cascade report` take: their own steps' sections (every other step is finished).
REPLAY_SECTIONS = {"replay": ("replay", "report", "run.threads"), "report": ("report", "run.threads")}


class UsageError(Exception):
    """A mistake on the command line (a missing option or folder): printed as ``cascade: error: ...``."""


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _BarSafeHandler(logging.StreamHandler):
    """Writes through ``tqdm.write``, which clears a progress bar and draws it again below the line, so a log line
    never cuts a bar in two."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # logging's own rule: a failing handler reports and does not raise
            self.handleError(record)


def _setup_logging(args: argparse.Namespace, log_file: Path | None = None) -> None:
    """Handlers on the library's logger ``cascade`` only: the root logger is left alone, so other libraries' INFO
    lines (faiss's loader reports every SIMD build it tries, with ModuleNotFoundError lines that read like
    failures) stay silent. -v: DEBUG; --quiet: warnings and errors only (and no progress bars)."""
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    lib = logging.getLogger("cascade")
    for h in list(lib.handlers):
        lib.removeHandler(h)
        h.close()
    console = _BarSafeHandler(sys.stderr)
    console.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
    console.setLevel(level)
    lib.addHandler(console)
    lib.setLevel(min(level, logging.INFO) if log_file is not None else level)
    if log_file is not None:  # the run's log keeps the INFO lines even under --quiet
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter(LOG_FORMAT))
        fh.setLevel(min(level, logging.INFO))
        lib.addHandler(fh)
    lib.propagate = False


def _progress(args: argparse.Namespace) -> bool:
    return not (getattr(args, "no_progress", False) or getattr(args, "quiet", False))


def _default_config_path() -> Path | None:
    if DEFAULT_CONFIG.exists():
        return DEFAULT_CONFIG
    packaged = Path(__file__).resolve().parents[1] / DEFAULT_CONFIG
    return packaged if packaged.exists() else None


def cmd_run(args: argparse.Namespace) -> int:
    from . import artifacts as A
    from .pipeline import load_config, run_pipeline
    from .pipeline.run import STEP_NAMES, check_device

    path = Path(args.config) if args.config else _default_config_path()
    _setup_logging(args)
    # fails on an unknown key, a wrong type or an impossible value before any work starts
    overrides = list(args.set or []) + ([f'run.device="{args.device}"'] if args.device else [])
    cfg = load_config(path, overrides, data_spec=args.data)
    check_device(cfg)  # and on a device the machine does not have
    unknown = [f for f in args.force or () if f not in STEP_NAMES]
    if unknown:
        raise UsageError(f"--force {unknown[0]!r}: no such step (steps: {', '.join(STEP_NAMES)})")
    run_dir = A.safe_join(cfg.run.runs_dir, cfg.run.name)
    _setup_logging(args, run_dir / "run.log")
    run_pipeline(cfg, force=tuple(args.force or ()), progress=_progress(args), update=args.update, wait=args.wait)
    print(f"report: {run_dir / 'report' / 'report.html'}")
    return 0


def _other_steps(*own: str) -> tuple[str, ...]:
    """Every pipeline step but ``own``: the steps `cascade replay` / `cascade report` take as they are."""
    from .pipeline.run import STEP_NAMES

    return tuple(s for s in STEP_NAMES if s not in own)


def cmd_replay(args: argparse.Namespace) -> int:
    from .pipeline import run_pipeline

    run_dir = Path(args.run)
    cfg = _run_config(run_dir, args.set, "replay")
    _setup_logging(args, run_dir / "run.log")
    res = run_pipeline(cfg, force=("replay", "report"), progress=_progress(args), update=args.update,
                       frozen=_other_steps("replay", "report"), wait=args.wait)
    print(json.dumps(res["replay"]["manifest"]["metrics"], indent=2, default=str))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .pipeline import run_pipeline

    run_dir = Path(args.run)
    cfg = _run_config(run_dir, args.set, "report")
    _setup_logging(args)
    run_pipeline(cfg, force=("report",), progress=False, update=args.update, frozen=_other_steps("report"),
                 wait=args.wait)
    print(f"report: {run_dir / 'report' / 'report.html'}")
    return 0


def _run_config(run_dir: Path, extra: list[str] | None, command: str):
    """A finished run's resolved config (its config.json), with ``--set`` overrides of the command's own
    sections (:data:`REPLAY_SECTIONS`) applied; any other key is refused: it would change a finished step."""
    from . import artifacts as A
    from .config import ConfigError, apply_overrides, from_dict, parse_override
    from .pipeline import PipelineConfig
    from .pipeline.config import check_settable

    allowed = REPLAY_SECTIONS[command]
    for item in extra or []:
        key = ".".join(parse_override(item)[0])
        if not any(key == a or key.startswith(a + ".") for a in allowed):
            raise ConfigError(f"cascade {command} --set {key}: {command} redoes only the {' and '.join(allowed[:-1])} "
                              f"step(s) of a finished run and cannot change {key.split('.')[0]!r}; use "
                              f"`cascade run CONFIG --set {item}` (it re-runs what the change affects)")
    check_settable(apply_overrides({}, list(extra or [])))
    if not (run_dir / "config.json").is_file():
        raise UsageError(f"{run_dir} is not a finished run (no {run_dir / 'config.json'}); runs are folders like "
                         "runs/default, written by `cascade run`")
    saved = A.read_json(run_dir / "config.json")
    saved["run"]["runs_dir"], saved["run"]["name"] = str(run_dir.parent), run_dir.name
    return from_dict(PipelineConfig, apply_overrides(saved, list(extra or [])))


def cmd_runs(args: argparse.Namespace) -> int:
    from .pipeline.runs import list_runs, runs_markdown

    _setup_logging(args)
    rows = list_runs(args.runs_dir)
    if not rows:
        print(f"no runs in {args.runs_dir} (a run is a folder with a config.json, written by `cascade run`)")
        return 0
    print(runs_markdown(rows))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .pipeline.runs import find_run, write_compare

    _setup_logging(args)
    dirs = [find_run(r, args.runs_dir) for r in args.runs]
    out = Path(args.out) if args.out else Path(args.runs_dir) / ("compare_" + "_vs_".join(d.name for d in dirs))
    _, files = write_compare(dirs, out)
    print(next(f for f in files if f.suffix == ".md").read_text())
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .pipeline.runs import find_run
    from .serve.export import export_run

    _setup_logging(args)
    if not (math.isfinite(args.tolerance) and args.tolerance > 0):
        raise UsageError(f"--tolerance {args.tolerance:g}: must be a finite number > 0 (the largest allowed "
                         "|exported - eager|)")
    run_dir = find_run(args.run, args.runs_dir)
    out = Path(args.out) if args.out else run_dir / "export" / args.format
    with _new_output(out):
        m = export_run(run_dir, args.format, out, variants=tuple(args.variant) if args.variant else None,
                       tolerance=args.tolerance)
    for name, info in m["models"].items():
        ins = ", ".join(f"{i['name']} {i['dtype']} [{', '.join(map(str, i['shape']))}]" for i in info["inputs"])
        print(f"{name}: {out / info['file']}  ({ins}) -> [{', '.join(map(str, info['output']['shape']))}], "
              f"max |exported - eager| {info['max_abs_diff']:.2g} on {info['checked_rows']} test rows")
    print(f"manifest: {out / 'manifest.json'}")
    return 0


def cmd_ablation(args: argparse.Namespace) -> int:
    from .pipeline.ablation import ablation_markdown, load_ablation_config, run_ablation, write_ablation

    cfg, settings = load_ablation_config(args.config or Path("pipelines") / "ablation.toml", args.set)
    _setup_logging(args)
    label = cfg.data.source.replace("-", "_")
    result = run_ablation(cfg, settings, label, progress=_progress(args))
    json_path, md_path = write_ablation(result, args.out, f"ablation_{label}")
    print(ablation_markdown(result))
    print(f"wrote {json_path} and {md_path}; add `report.ablation = \"{json_path}\"` to a run's "
          "config to show it in its report")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    _setup_logging(args)
    if args.source == "world":
        from .data.world import WorldConfig, generate_world
        from .run_lock import folder_lock

        for flag, given in (("a PATH", args.path), ("--check", args.check)):
            if given:
                raise UsageError(f"cascade data world takes no {flag}: it generates the world into --out")
        cfg = WorldConfig(seed=0 if args.seed is None else args.seed, n_users=args.n_users, n_items=args.n_items,
                          n_days=21 if args.n_days is None else args.n_days)
        with folder_lock(args.out or "world", wait=args.wait):
            world = generate_world(args.out or "world", cfg, progress=_progress(args))
        print(json.dumps(world.summary(), indent=2, default=str))
        return 0
    from .data import custom, kuairand, movielens
    from .data.describe import describe_dataset
    from .data.schema import DataValidationError

    given = [f for f, v in (("--out", args.out), ("--seed", args.seed), ("--n-users", args.n_users),
                            ("--n-items", args.n_items), ("--n-days", args.n_days),
                            ("--wait", args.wait or None)) if v is not None]
    if given:
        raise UsageError(f"cascade data {args.source}: {given[0]} applies to `cascade data world` only")
    if not args.path:
        what = "mapping TOML" if args.source == "custom" else "dataset folder"
        raise UsageError(f"cascade data {args.source} needs the {what}: cascade data {args.source} PATH --check")
    loaders = {"kuairand": kuairand.load_kuairand, "movielens-100k": movielens.load_movielens_100k,
               "movielens-1m": movielens.load_movielens_1m, "custom": custom.load_custom}
    ds = loaders[args.source](args.path)
    described = describe_dataset(ds, ds.utc_offset_hours)
    print(json.dumps(described, indent=2, default=str))
    if described["problems"]:
        raise DataValidationError(f"{args.path}: `cascade run` would refuse these data: "
                                  + "; ".join(described["problems"]))
    print(f"ok: run it with `cascade run --data {args.source}:{args.path}`", file=sys.stderr)
    return 0


def _npy(path: str | None, option: str, action: str):
    """A .npy array given with ``option``; a missing option or file is a UsageError naming it."""
    import numpy as np

    if not path:
        raise UsageError(f"cascade index {action} needs {option} FILE.npy")
    if not Path(path).is_file():
        raise UsageError(f"{option} {path}: no such file")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        raise UsageError(f"{option} {path}: not a .npy array ({e})") from None


def _matrix(x, option: str, path: str, d: int | None = None, of: str = ""):
    """``x``, read from ``path`` (given with ``option``), as float32 [n, d]; another shape (``d``: the dimension
    ``of`` has), a dtype that is no number or a non-finite value is a UsageError naming the option and the file."""
    from .index.exact import as_float32_matrix

    if x.ndim != 2:
        raise UsageError(f"{option} {path}: must be a 2-d array [n, d], got shape {x.shape}")
    if d is not None and x.shape[1] != d:
        raise UsageError(f"{option} {path}: vectors of dimension {x.shape[1]}, but {of} has dimension {d}")
    try:
        return as_float32_matrix(x, f"{option} {path}")
    except ValueError as e:  # a dtype that is no number, a nan / inf
        raise UsageError(str(e)) from None


def _k(k: int | None, n_items: int, of: str) -> int:
    """--k: results per query; None -> 100 (all ``n_items`` items of ``of`` where fewer). Below 1, or above the
    items (the rest of a row would be -1 ids), is refused."""
    if k is None:
        return min(100, n_items)
    if k < 1:
        raise UsageError(f"--k {k}: must be an integer >= 1")
    if k > n_items:
        raise UsageError(f"--k {k} is more than the {n_items:,} items of {of}: use --k {n_items} or less")
    return k


def _check_recall_target(target: float | None) -> None:
    if target is not None and not (math.isfinite(target) and 0.0 < target <= 1.0):
        raise UsageError(f"--recall-target {target:g}: must be in (0, 1]")


def _check_factory(factory: str, n: int, d: int, name: str) -> str:
    """``factory`` checked against a corpus of ``n`` items of dimension ``d``; a UsageError names ``name``."""
    from .index.factory import check_factory

    try:
        check_factory(factory, n, d, name)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return factory


def _refuse(args: argparse.Namespace, options: tuple[str, ...], message: str) -> None:
    """A UsageError if one of ``options`` (e.g. "--model-hash") was given: ``message`` with it for ``{}``."""
    given = [o for o in options if getattr(args, o[2:].replace("-", "_")) is not None]
    if given:
        raise UsageError(message.format(given[0]))


@contextmanager
def _new_output(out: Path, wait: bool | None = None) -> Iterator[None]:
    """For a ``with`` block that writes the folder ``out`` (holding its lock unless ``wait`` is None). If the block
    fails, what was made for it goes: the topmost of ``out`` and its parents that did not exist before, unless another
    process wrote into ``out`` meanwhile. A folder that existed before is never removed."""
    from .run_lock import LOCK_FILE, folder_lock

    new = None
    for p in (out, *out.parents):
        if p.exists() or p.is_symlink():
            break
        new = p
    with nullcontext() if wait is None else folder_lock(out, wait=wait):
        if out.is_dir() and any(f.name != LOCK_FILE for f in out.iterdir()):
            new = None  # made and written by a process this one waited for (--wait)
        try:
            yield
        except BaseException:
            if new is not None and new.is_dir():
                shutil.rmtree(new)
            raise


def cmd_index(args: argparse.Namespace) -> int:
    _setup_logging(args)
    if args.action == "search":
        return _index_search(args)
    return _index_build_run(args) if args.run else _index_build(args)


def _index_build_run(args: argparse.Namespace) -> int:
    """cascade index build --run RUN: the index of a finished run's retrieval tower (its inputs checked first)."""
    import pandas as pd

    from . import artifacts as A
    from .config import from_dict
    from .index.factory import default_factory
    from .index.faiss_index import UnreachableRecallError
    from .pipeline.config import IndexSection
    from .pipeline.index import build_run_index

    _refuse(args, ("--embeddings", "--ids", "--queries", "--model-hash", "--metric", "--index"),
            "cascade index build --run takes the run's tower, its item ids, queries, hash and metric; {} does not "
            "apply")
    run = Path(args.run)
    if not (run / "config.json").is_file():
        raise UsageError(f"--run {args.run}: not a finished run (no config.json)")
    variant = args.variant or "distilled"
    students = run / "students"
    if not (students / A.MANIFEST).is_file():
        raise UsageError(f"--run {args.run}: the run has not finished its students step (no {students / A.MANIFEST}), "
                         "which trains the retrieval tower to index; finish the run with `cascade run`")
    retrieval = students / variant / "retrieval"
    if not retrieval.is_dir():
        have = sorted(p.name for p in students.iterdir() if (p / "retrieval").is_dir())
        raise UsageError(f"--run {args.run} --variant {variant}: the run has no {variant!r} retrieval tower (it has "
                         f"{have})")
    A.verify_listed(students, [f"{variant}/retrieval/model.pt", f"{variant}/retrieval/config.json"])
    n = len(pd.read_parquet(run / "data" / "items.parquet", columns=["item_id"]))
    d = int(A.read_json(retrieval / "config.json")["out_dim"])  # the tower's embedding dimension
    if args.k is not None:
        _k(args.k, n, f"the run {args.run}")
    _check_recall_target(args.recall_target)
    saved = A.read_json(run / "config.json").get("index", {})
    _check_factory(args.factory or saved.get("factory") or default_factory(n), n, d,
                   "--factory" if args.factory else f"the run's index.factory ({run / 'config.json'})")
    given = {k: v for k, v in (("factory", args.factory), ("k", args.k), ("recall_target", args.recall_target))
             if v is not None}
    c = from_dict(IndexSection, {**saved, **given}, prefix="index")
    with _new_output(Path(args.out), wait=args.wait):
        try:
            m = build_run_index(run, args.out, variant=variant, c=c)
        except UnreachableRecallError as e:
            option = "--recall-target" if args.recall_target is not None else "the run's index.recall_target"
            raise UsageError(f"{option} {c.recall_target:g}: {e}") from None
    print(json.dumps(m, indent=2, default=str))
    return 0


def _index_build(args: argparse.Namespace) -> int:
    """cascade index build --embeddings FILE: the index of the given vectors (every input checked first)."""
    import numpy as np

    from .index.factory import default_factory
    from .index.faiss_index import ItemIndex, UnreachableRecallError, check_item_ids

    _refuse(args, ("--variant", "--index"), "cascade index build --embeddings indexes the vectors given; {} does not "
                                            "apply")
    xb = _matrix(_npy(args.embeddings, "--embeddings", "build"), "--embeddings", args.embeddings)
    n, d = xb.shape
    if n == 0:
        raise UsageError(f"--embeddings {args.embeddings}: no rows, nothing to index")
    ids = np.arange(n, dtype=np.int64)
    if args.ids:
        try:
            ids = check_item_ids(_npy(args.ids, "--ids", "build"), n)
        except ValueError as e:
            raise UsageError(f"--ids {args.ids}: {e}") from None
    factory = _check_factory(args.factory or default_factory(n), n, d, "--factory")
    xq, k = None, None
    if args.queries:
        xq = _matrix(_npy(args.queries, "--queries", "build"), "--queries", args.queries, d,
                     f"--embeddings {args.embeddings}")
        k = _k(args.k, n, f"--embeddings {args.embeddings}")
    else:
        _refuse(args, ("--k", "--recall-target"), "cascade index build: {} sets the recall sweep, which runs on "
                                                  "--queries; give them too")
    _check_recall_target(args.recall_target)
    target = 0.95 if args.recall_target is None else args.recall_target
    with _new_output(Path(args.out), wait=args.wait):
        index = ItemIndex.build(xb, ids, metric=args.metric or "ip", factory=factory)
        if xq is not None and index.is_exact:
            logging.getLogger("cascade.cli").warning(
                "index build: %s is exact search, so --queries has no nprobe / efSearch sweep to drive", factory)
        elif xq is not None:
            index.sweep(xq, k)
            try:
                index.set_operating_point(target)
            except UnreachableRecallError as e:
                raise UsageError(f"--recall-target {target:g}: {e}") from None
        m = index.save(args.out, model_hash=args.model_hash or "unknown")
    print(json.dumps(m, indent=2, default=str))
    return 0


def _index_search(args: argparse.Namespace) -> int:
    """cascade index search: the top --k item ids of each query, saved as int64 [nq, k] .npy."""
    import numpy as np

    from . import artifacts as A
    from .index.faiss_index import ItemIndex

    _refuse(args, ("--run", "--embeddings", "--ids", "--factory", "--recall-target", "--metric", "--variant"),
            "cascade index search uses the index as it was built; {} applies to `cascade index build`")
    if not args.index or not (Path(args.index) / "manifest.json").is_file():
        raise UsageError(f"cascade index search needs --index FOLDER written by `cascade index build` "
                         f"(got {args.index!r})")
    queries = _npy(args.queries, "--queries", "search")
    index = ItemIndex.load(args.index, expect_model_hash=args.model_hash)
    xq = _matrix(queries, "--queries", args.queries, index.dim, f"the index {args.index}")
    k = _k(args.k, index.n_items, f"the index {args.index}")
    _, items = index.search(xq, k)
    short = int((items < 0).any(axis=1).sum())
    if short:  # an approximate index can find fewer than k items
        logging.getLogger("cascade.cli").warning("index search: %d of %d queries found fewer than %d items: their "
                                                 "rows end in -1 ids", short, len(xq), k)
    with A.atomic_path(args.out) as tmp, open(tmp, "wb") as f:  # a file object: np.save on a path appends ".npy"
        np.save(f, items, allow_pickle=False)
    print(f"searched {len(xq)} queries, k={k}: item ids saved to {args.out}")
    return 0


def cmd_ddp_ranklog(args: argparse.Namespace) -> int:
    from .distributed import is_main
    from .pipeline.distributed_ranklog import run_distributed_ranklog

    _setup_logging(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    summary = run_distributed_ranklog(args.data, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                      max_requests=args.max_requests, n_candidates=args.n_candidates,
                                      device=args.device, seed=args.seed, students=args.students,
                                      student_batch_size=args.student_batch_size, student_epochs=args.student_epochs)
    if is_main() and summary is not None:
        print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    # -v / --verbose is accepted before or after the subcommand (SUPPRESS: a subcommand's default never hides the
    # top-level flag)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging, and the traceback of an error")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="warnings and errors only, no progress bars (a run's run.log keeps the INFO lines)")
    lock = argparse.ArgumentParser(add_help=False)
    lock.add_argument("--wait", action="store_true",
                      help="if another process holds the output folder, wait for it instead of failing")
    raw = argparse.RawDescriptionHelpFormatter

    from . import __version__

    p = argparse.ArgumentParser(prog="cascade", parents=[common], formatter_class=raw,
                                description="A distilled cascade recommender: one teacher, every stage a student.",
                                epilog="every command has its own --help with examples, e.g. cascade run --help")
    p.add_argument("--version", action="version", version=f"cascade {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", parents=[common, lock], formatter_class=raw, epilog=EPILOG_RUN,
                       help="run the pipeline data -> channels -> teacher -> ranklog -> students -> index -> replay "
                            "-> report",
                       description="Run (or resume) the pipeline; steps whose config and inputs are unchanged are "
                                   "skipped.")
    r.add_argument("config", nargs="?", help="pipeline TOML (default: pipelines/default.toml)")
    r.add_argument("--data", metavar="SOURCE[:PATH]",
                   help="the dataset, on top of the config: custom:MAPPING.toml (your own logs), kuairand:DIR, "
                        "movielens-100k:DIR, movielens-1m:DIR or world. It replaces the config's [data] table and "
                        "names the run after the dataset unless --set run.name names it")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. teacher.train.epochs=3")
    r.add_argument("--force", action="append", metavar="STEP", help="redo STEP even if it is up to date")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where every training step trains (run.device; default: the config's, cpu)")
    r.add_argument("--update", action="store_true",
                   help="the run folder exists with another config: redo the steps the change affects in it (without "
                        "this a different config is refused, naming the keys; or pick a new --set run.name=...)")
    r.set_defaults(func=cmd_run)

    for name, fn, help_, also in (
            ("replay", cmd_replay, "replay the test requests of a finished run again (then rebuild its report)",
             "  cascade replay runs/default --set replay.k=20 --set replay.n_prerank=50 --update"),
            ("report", cmd_report, "rebuild a finished run's report", "  cascade report runs/tiny -v")):
        q = sub.add_parser(name, parents=[common, lock], help=help_, description=help_[0].upper() + help_[1:] + ". "
                           f"Only the {name} step(s) are redone; the other steps are used as they are (verified).",
                           epilog=f"examples:\n  cascade {name} runs/default\n{also}", formatter_class=raw)
        q.add_argument("run", help="the run folder, e.g. runs/default")
        q.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help=f"override a value of {' / '.join(REPLAY_SECTIONS[name])} (other keys: cascade run)")
        q.add_argument("--update", action="store_true",
                       help="with --set: rewrite the run's config and redo the step(s) (without this a change is "
                            "refused, naming the keys)")
        q.add_argument("--no-progress", action="store_true")
        q.set_defaults(func=fn)

    ls = sub.add_parser("runs", parents=[common],
                        help="list the runs under a runs folder with their headline metrics",
                        epilog="examples:\n  cascade runs\n  cascade runs --runs-dir path/to/runs",
                        formatter_class=raw)
    ls.add_argument("--runs-dir", default="runs", help="the folder holding the runs (default: runs)")
    ls.set_defaults(func=cmd_runs)

    c = sub.add_parser("compare", parents=[common],
                       help="two or more runs side by side: config differences and metrics (md + html)",
                       epilog="examples:\n  cascade compare default deepfm\n"
                              "  cascade compare runs/default other/runs/tiny --out cmp",
                       formatter_class=raw)
    c.add_argument("runs", nargs="+", metavar="RUN", help="run names under --runs-dir, or run folders")
    c.add_argument("--runs-dir", default="runs", help="where run names are looked up (default: runs)")
    c.add_argument("--out", default=None,
                   help="folder for compare.md / compare.html / compare.json (default: RUNS_DIR/compare_A_vs_B)")
    c.set_defaults(func=cmd_compare)

    x = sub.add_parser("export", parents=[common],
                       help="export a run's towers and rankers (torch.export or ONNX), each checked against its "
                            "eager model",
                       epilog="examples:\n  cascade export default --format torch-export\n"
                              "  cascade export runs/default --format onnx --variant distilled --out serving/\n"
                              "(--format onnx needs pip install 'cascade-distill[export]')",
                       formatter_class=raw)
    x.add_argument("run", help="a run name under --runs-dir, or a run folder")
    x.add_argument("--format", required=True, choices=("torch-export", "onnx"))
    x.add_argument("--out", default=None, help="output folder (default: RUN/export/FORMAT)")
    x.add_argument("--variant", action="append", metavar="VARIANT",
                   help="only these two-tower variants (default: all the run trained: distilled, ground_truth)")
    x.add_argument("--runs-dir", default="runs", help="where run names are looked up (default: runs)")
    x.add_argument("--tolerance", type=float, default=1e-5,
                   help="largest allowed |exported - eager| on the parity rows (default 1e-5)")
    x.set_defaults(func=cmd_export)

    a = sub.add_parser("ablation", parents=[common],
                       help="the distillation ablation of the two-tower students over seeds",
                       epilog="examples:\n"
                              "  cascade ablation                  # pipelines/ablation.toml, the world\n"
                              "  cascade ablation --set data.source='movielens-100k' --set data.path=path/to/ml-100k\n"
                              "  cascade ablation --set ablation.seeds=[0]",
                       formatter_class=raw)
    a.add_argument("config", nargs="?", help="ablation TOML (default: pipelines/ablation.toml)")
    a.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
    a.add_argument("--out", default="runs", help="folder for ablation_<source>.json / .md")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=cmd_ablation)

    d = sub.add_parser("data", parents=[common, lock], help="generate the world, or check a dataset and its loader",
                       description="world: generate the synthetic world into --out. Any other source: load the "
                                   "dataset as a run would, check it, and print what was found (rows, users, items, "
                                   "clicks, days, features per side, suggested split days); nothing is written.",
                       epilog="examples:\n  cascade data world --out /tmp/world --n-users 2000 --n-items 1500\n"
                              "  cascade data custom examples/own_logs/mapping.toml --check\n"
                              "  cascade data kuairand path/to/KuaiRand-Pure/data\n"
                              "  cascade data movielens-100k path/to/ml-100k",
                       formatter_class=raw)
    d.add_argument("source", choices=("world", "kuairand", "movielens-100k", "movielens-1m", "custom"))
    d.add_argument("path", nargs="?", help="dataset folder (custom: the mapping TOML)")
    d.add_argument("--check", action="store_true",
                   help="check the dataset and print what was found (what a loader source always does)")
    d.add_argument("--out", default=None, help="world: output folder (default: world)")
    d.add_argument("--seed", type=int, default=None, help="world: seed (default 0)")
    d.add_argument("--n-users", type=int, default=None, help="world: users (default: the real tables')")
    d.add_argument("--n-items", type=int, default=None, help="world: items (default: the real tables')")
    d.add_argument("--n-days", type=int, default=None, help="world: days (default 21)")
    d.set_defaults(func=cmd_data)

    i = sub.add_parser("index", parents=[common, lock], help="build or search a FAISS inner-product index",
                       epilog="examples:\n"
                              "  cascade index build --run runs/default --out idx        # a run's retrieval tower\n"
                              "  cascade index build --embeddings items.npy --ids ids.npy --out idx --model-hash abc\n"
                              "  cascade index search --index idx --queries users.npy --k 100 --out top.npy",
                       formatter_class=raw)
    i.add_argument("action", choices=("build", "search"))
    i.add_argument("--run", help="build: a finished run folder; indexes its retrieval tower's items")
    i.add_argument("--variant", default=None, help="build --run: the student variant (default: distilled)")
    i.add_argument("--embeddings", help="build: float32 [n, d] .npy of item embeddings")
    i.add_argument("--ids", help="build: int64 [n] .npy of item ids (default 0..n-1)")
    i.add_argument("--factory", default=None,
                   help="Flat | IVF{n},Flat | HNSW{M} | IVF{n},PQ{m} (default: by corpus size; --run: the run's)")
    i.add_argument("--metric", default=None, choices=("ip", "l2"), help="build --embeddings: the metric (default ip)")
    i.add_argument("--queries", help=".npy of float32 [nq, d] queries (build: for the nprobe/efSearch sweep)")
    i.add_argument("--k", type=int, default=None,
                   help="results per query, at most the items (default 100, or all the items where fewer; build "
                        "--run: the run's index.k)")
    i.add_argument("--recall-target", type=float, default=None, help="build: the operating point (default 0.95)")
    i.add_argument("--index", help="search: index folder")
    i.add_argument("--model-hash", default=None,
                   help="build: hash of the tower the embeddings come from (recorded; default 'unknown'); search: "
                        "refuse an index built from another tower (default: no check)")
    i.add_argument("--out", required=True, help="build: index folder; search: .npy for the result ids")
    i.set_defaults(func=cmd_index)
    g = sub.add_parser("ddp-ranklog", parents=[common],
                       help="teacher with DistributedDataParallel + a sharded rank log, under torchrun",
                       epilog="examples:\n"
                              "  torchrun --standalone --nproc_per_node 2 -m cascade.cli ddp-ranklog \\\n"
                              "      --data runs/tiny/data --out runs/ddp\n"
                              "  cascade ddp-ranklog --data runs/tiny/data --out runs/ddp1   # one process",
                       formatter_class=raw)
    g.add_argument("--data", required=True, help="a run's data folder (runs/<name>/data)")
    g.add_argument("--out", required=True)
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=2048, help="per rank")
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--max-requests", type=int, default=2000)
    g.add_argument("--n-candidates", type=int, default=200)
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    g.add_argument("--threads", type=int, default=None, help="torch threads per process")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--students", action="store_true", help="also train the two-tower students with DDP")
    g.add_argument("--student-batch-size", type=int, default=None, help="per rank (default: the pipeline's)")
    g.add_argument("--student-epochs", type=int, default=None, help="default: the pipeline's")
    g.set_defaults(func=cmd_ddp_ranklog)
    return p


def main(argv: list[str] | None = None) -> int:
    """The `cascade` command: 0 on success; a user mistake (a bad config, data, path or option, a run folder in
    use) prints ``cascade: error: ...`` and returns 2 (with -v also its traceback); anything else is a bug and
    raises."""
    from .artifacts import ArtifactError
    from .config import ConfigError
    from .data.schema import DataValidationError
    from .index.faiss_index import IndexMismatchError
    from .run_lock import RunLockedError

    args = build_parser().parse_args(argv)
    args.verbose, args.quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    if args.verbose and args.quiet:
        print("cascade: error: -v/--verbose and -q/--quiet exclude each other", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ConfigError, DataValidationError, ArtifactError, IndexMismatchError, RunLockedError, UsageError,
            FileNotFoundError) as e:
        if args.verbose:
            traceback.print_exc()
        print(f"cascade: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
