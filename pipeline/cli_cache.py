"""`lkspec cache build|info|verify|ls|gc`: build the target-logit cache on Ray and manage cache roots."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from pipeline.cli_error import CliError


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to options that have a meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        meaningless = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if action.option_strings and not meaningless and "default" not in text:
            text += " (default: %(default)s)"
        return text


def register(subparsers) -> None:
    """Add `cache` and its sub-commands to the lkspec parser."""
    from pipeline.build import BuildConfig
    from trainer.settings import add_flags

    cache = subparsers.add_parser(
        "cache", help="build and manage target-logit caches",
        description="Run the target once over a dataset on Ray and keep its top-k log-probs in a "
                    "content-addressed, checksummed cache; inspect, verify, list and garbage-collect caches.",
    )
    commands = cache.add_subparsers(dest="cache_command", metavar="ACTION")
    commands.required = True

    build = commands.add_parser(
        "build", help="run the target over a dataset and write a cache (resumes, reuses)",
        description="Tokenize DATA with the target's chat template, run the target teacher-forced on a pool "
                    "of Ray actors and store the top-k log-probs of every assistant token. The cache "
                    "directory is OUT/<content key>; the last line printed is its path. A complete cache "
                    "with the same key is reused; an interrupted build resumes where it stopped.",
    )
    add_flags(build, BuildConfig)
    build.set_defaults(func=cmd_build)

    info = commands.add_parser("info", help="describe a cache", description="Describe a cache directory.")
    info.add_argument("cache_dir", type=Path, metavar="DIR")
    info.add_argument("--json", action="store_true", help="print the manifest (without shard list) and stats as JSON")
    info.set_defaults(func=cmd_info)

    verify = commands.add_parser(
        "verify", help="check every file of a cache (exit 1 on any problem)",
        description="Check checksums, sizes, schema version, decoding and counts of every shard.",
    )
    verify.add_argument("cache_dir", type=Path, metavar="DIR")
    verify.set_defaults(func=cmd_verify)

    ls = commands.add_parser("ls", help="list the caches under a root", description="List the caches under ROOT.")
    ls.add_argument("root", type=Path, metavar="ROOT")
    ls.set_defaults(func=cmd_ls)

    gc = commands.add_parser(
        "gc", help="remove caches that no run references", formatter_class=_DefaultsFormatter,
        description="Remove the complete caches under ROOT that no run references (RUNS/**/run.json naming "
                    "the cache by 'cache_key' or 'cache': {'key'|'path'}), incomplete builds untouched for "
                    "--stale-hours, and the temporary files of dead writers. A cache in use (its lock held by a "
                    "build, a training run or a reader) is skipped.",
    )
    gc.add_argument("root", type=Path, metavar="ROOT")
    gc.add_argument("--runs", type=Path, action="append", default=None,
                    help="runs directory to scan for run.json, repeatable (default: ./runs)")
    gc.add_argument("--stale-hours", type=float, default=24.0,
                    help="remove incomplete builds untouched for this long")
    gc.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    gc.set_defaults(func=cmd_gc)


def cmd_build(args: argparse.Namespace) -> int:
    """`cache build`: validate, build (or resume, or reuse) and print the cache directory last."""
    from cache import CacheError
    from pipeline.build import BuildConfig, run_build
    from pipeline.resolve.chat import ChatTemplateError
    from pipeline.resolve.datasets import DataError
    from pipeline.resolve.models import ModelNotFoundError
    from pipeline.target_pass import BuildError
    from trainer.settings import ConfigError, from_args

    try:
        config = from_args(BuildConfig, args)
        outcome = run_build(config, log=lambda message: print(message, flush=True))  # reports reuse / resume
    except ConfigError as exc:
        raise CliError(exc.flag_message()) from None
    except (ModelNotFoundError, DataError, ChatTemplateError, BuildError, CacheError) as exc:
        raise CliError(str(exc)) from None
    print(outcome.path)
    return 0


def _open(cache_dir: Path, allow_incomplete: bool = True):
    from cache import CacheError, open_cache

    try:
        return open_cache(cache_dir, allow_incomplete=allow_incomplete)
    except CacheError as exc:
        raise CliError(str(exc)) from None


def _stats(cache_dir: Path) -> dict:
    try:
        return json.loads((cache_dir / "stats.json").read_text())
    except (OSError, ValueError):
        return {}


def cmd_info(args: argparse.Namespace) -> int:
    """`cache info`: a human summary, or the manifest and stats as JSON."""
    reader = _open(args.cache_dir)
    manifest = {name: reader.manifest[name] for name in reader.manifest if name != "shards"}
    stats = _stats(args.cache_dir)
    size = sum(sum(info.bytes.values()) for info in reader.manifest.shard_infos())
    if args.json:
        print(json.dumps({"path": str(args.cache_dir.resolve()), "manifest": manifest,
                          "num_shards": len(reader.shard_indices()), "bytes": size, "stats": stats},
                         indent=1, sort_keys=True))
        return 0
    identity = manifest["identity"]
    rows = [
        ("key", manifest["key"]),
        ("status", "complete" if manifest["complete"] else
         f"INCOMPLETE ({len(reader.shard_indices())} of {manifest['num_shards_planned']} shards)"),
        ("target", f"{stats.get('target', '?')} (weights sha256 "
                   f"{identity.get('target', {}).get('weights_sha256', '?')[:16]})"),
        ("data", f"{stats.get('data', '?')} ({_describe_dataset(identity.get('dataset', {}))})"),
        ("sequences", manifest["num_sequences"]),
        ("trained positions", manifest["num_positions"]),
        ("k", manifest["k"]),
        ("vocab size", manifest["vocab_size"]),
        ("max length", identity.get("max_length")),
        ("dtype", identity.get("dtype")),
        ("features", ", ".join(f"{n} [{s['dim']}]" for n, s in manifest["features"].items()) or "none"),
        ("regenerated", "yes" if identity.get("generation", {}).get("regenerate") else "no"),
        ("shards", f"{len(reader.shard_indices())} ({manifest['num_shards_planned']} planned)"),
        ("size", f"{size / 2**20:.2f} MiB"
         + (f" ({size / manifest['num_positions']:.1f} B per trained position)" if manifest["num_positions"] else "")),
        ("tokenizer sha256", manifest["tokenizer_sha256"]),
    ]
    if stats:
        rows.append(("last build", f"{stats.get('wall_seconds', 0):.1f} s, {stats.get('tokens_per_second') or 0:.0f} tok/s, "
                                   f"skipped {stats.get('skipped', {}).get('total', 0)} rows, "
                                   f"{stats.get('truncated_sequences', 0)} truncated"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _describe_dataset(dataset: dict) -> str:
    limit = f", limit {dataset['limit']}" if dataset.get("limit") else ""
    if dataset.get("kind") == "package":
        return f"{dataset['package']}=={dataset['version']}{limit}"
    return f"{dataset.get('format')} sha256 {dataset.get('sha256', '?')[:16]}{limit}"


def cmd_verify(args: argparse.Namespace) -> int:
    """`cache verify`: check every file; exit 1 and list the problems if any."""
    from cache import CacheCorruptError, CacheError, CacheMismatchError, open_cache

    started = time.perf_counter()
    try:
        reader = open_cache(args.cache_dir, allow_incomplete=True)
    except (CacheCorruptError, CacheMismatchError) as exc:  # the manifest or a shard's structure lies
        problems = [str(exc)]
    except CacheError as exc:
        raise CliError(str(exc)) from None
    else:
        problems = reader.verify()
    if problems:
        for problem in problems:
            print(f"FAIL {problem}")
        print(f"{args.cache_dir}: {len(problems)} problem(s) found")
        return 1
    manifest = reader.manifest
    print(f"ok: {args.cache_dir}: {len(reader.shard_indices())} shards, {manifest['num_sequences']} sequences, "
          f"{manifest['num_positions']} positions verified in {time.perf_counter() - started:.1f} s")
    return 0


def _scan(root: Path) -> list[tuple[Path, object]]:
    """(directory, manifest or the error loading it) for every cache directory under root."""
    from cache.atomic import TEMP_PREFIX

    if not root.is_dir():
        raise CliError(f"{root} is not a directory")
    return [(directory, _manifest_or_error(directory))
            for directory in sorted(p for p in root.iterdir() if p.is_dir() and (p / "manifest.json").exists()
                                    and not p.name.startswith(TEMP_PREFIX))]  # not a cache gc is deleting


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, belongs to another user
    return True


def _manifest_or_error(directory: Path) -> object:
    from cache import CacheError, load_manifest

    try:
        return load_manifest(directory)
    except CacheError as exc:
        return exc


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def cmd_ls(args: argparse.Namespace) -> int:
    """`cache ls`: one table row per cache directory under ROOT."""
    caches = _scan(args.root)
    if not caches:
        print(f"no caches under {args.root}")
        return 0
    header = ("KEY", "STATUS", "SEQS", "POSITIONS", "K", "FEATURES", "SIZE", "TARGET", "DATA")
    rows = []
    for directory, manifest in caches:
        if isinstance(manifest, Exception):
            rows.append((directory.name, "unreadable", "-", "-", "-", "-", f"{_dir_bytes(directory) / 2**20:.1f}M",
                         "-", str(manifest)[:40]))
            continue
        stats = _stats(directory)
        status = "complete" if manifest["complete"] else (
            f"partial {len(manifest.committed_indices())}/{manifest['num_shards_planned']}")
        rows.append((manifest["key"], status, str(manifest["num_sequences"]), str(manifest["num_positions"]),
                     str(manifest["k"]), ",".join(manifest["features"]) or "-",
                     f"{_dir_bytes(directory) / 2**20:.1f}M", str(stats.get("target", "?")),
                     str(stats.get("data", "?"))))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def referenced_keys(runs_dirs: list[Path]) -> set[str]:
    """Cache keys recorded by runs: every run.json under the runs directories."""
    keys = set()
    for runs in runs_dirs:
        for run_json in sorted(runs.rglob("run.json")):
            try:
                record = json.loads(run_json.read_text())
            except (OSError, ValueError) as exc:
                raise CliError(f"{run_json}: unreadable run record ({exc}); refusing to collect garbage") from None
            keys |= _run_cache_keys(record)
    return keys


def _run_cache_keys(record: object) -> set[str]:
    """The cache keys a run record names: "cache_key", or "cache": {"key", "path"} as the trainer writes."""
    if not isinstance(record, dict):
        return set()
    cache = record.get("cache") if isinstance(record.get("cache"), dict) else {}
    candidates = [record.get("cache_key"), cache.get("key")]
    candidates += [Path(p).name for p in (cache.get("path"), record.get("cache_path")) if isinstance(p, str) and p]
    return {key for key in candidates if isinstance(key, str) and key}


def cmd_gc(args: argparse.Namespace) -> int:
    """`cache gc`: remove unreferenced complete caches, stale incomplete builds and dead temp files.

    Each cache is examined and removed under its exclusive lock, taken without waiting: a cache that a
    build, a training run or a reader holds is skipped.
    """
    from cache import CacheError
    from cache.atomic import TEMP_PREFIX
    from cache.lock import LOCK_NAME, lock_cache

    runs_dirs = args.runs or [Path("runs")]
    existing = [d for d in runs_dirs if d.is_dir()]
    if not existing:
        raise CliError(f"no runs directory found ({', '.join(map(str, runs_dirs))}): without one every cache "
                       "looks unreferenced; pass --runs DIR")
    keep = referenced_keys(existing)
    now = time.time()
    removals: list[tuple[Path, str]] = []
    locks = []  # held until the removals are done
    kept = 0
    for trash in sorted(args.root.glob(f"{TEMP_PREFIX}gc-*")):  # ".tmp-gc-KEY.PID": what a killed gc left
        if trash.is_dir() and not _alive(int(trash.suffix[1:]) if trash.suffix[1:].isdigit() else 0):
            removals.append((trash, "left by an interrupted gc"))
    for directory, _ in _scan(args.root):
        try:
            lock = lock_cache(directory, exclusive=True, wait=False)
        except CacheError as exc:  # e.g. a read-only cache root: nothing gc could remove there anyway
            print(f"skip {directory.name}: {exc}")
            continue
        if lock is None:
            print(f"skip {directory.name}: in use (a build, training run or reader holds {directory / LOCK_NAME})")
            kept += 1
            continue
        locks.append(lock)
        manifest = _manifest_or_error(directory)  # as it is now, under the lock
        if isinstance(manifest, Exception):
            print(f"skip {directory.name}: {manifest}")
            continue
        age = now - (directory / "manifest.json").stat().st_mtime
        if manifest["key"] in keep:
            kept += 1
        elif manifest["complete"]:
            removals.append((directory, "complete, no run references it"))
            continue
        elif age > args.stale_hours * 3600:
            removals.append((directory, f"incomplete build untouched for {age / 3600:.1f} h"))
            continue
        else:
            kept += 1
        for temp in directory.glob(f"{TEMP_PREFIX}*"):  # under the exclusive lock no writer is alive
            removals.append((temp, "temporary file of a dead writer"))
    freed = 0
    try:
        for path, reason in removals:
            size = _dir_bytes(path) if path.is_dir() else path.stat().st_size
            freed += size
            print(f"{'would remove' if args.dry_run else 'remove'} {path} ({size / 2**20:.1f} MiB): {reason}")
            if args.dry_run:
                continue
            if path.is_dir():
                if not path.name.startswith(TEMP_PREFIX):  # a build waiting on its lock then starts afresh
                    path = path.rename(path.with_name(f"{TEMP_PREFIX}gc-{path.name}.{os.getpid()}"))
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    finally:
        for lock in locks:
            lock.release()
    verb = "would free" if args.dry_run else "freed"
    print(f"{verb} {freed / 2**20:.1f} MiB; kept {kept} cache(s) ({len(keep)} key(s) referenced by runs)")
    return 0
