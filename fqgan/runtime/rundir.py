"""The run folder: a training command never destroys an earlier run by accident.

* A folder that holds a run (``config.json``, ``metrics.jsonl``, ``last.pt`` or ``last.dcp``) is continued
  (``--resume``) or moved aside (``--overwrite``), never rewritten: :func:`prepare_run_dir`.
* ``--overwrite`` moves the earlier run's files into ``previous/<date>-<time>/`` inside the folder.
* What a killed save leaves (``.last.pt.*.tmp``, ``.last.dcp.tmp/``) is removed at the next start, and a
  sharded save cut between its two renames is completed: :func:`clean_stale_files`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import time
from pathlib import Path

from .checkpoint import LAST
from .errors import MissingFileError, RunExistsError, UsageError

__all__ = ["RUN_FILES", "RunExistsError", "check_out_dir", "check_output_file", "clean_stale_files", "describe_run",
           "holds_run", "prepare_run_dir"]

# What a training run writes at the top of its folder (and --overwrite moves aside).
RUN_FILES = ("config.json", "metrics.jsonl", *LAST, "step_*.pt", "step_*.dcp", "PREEMPTED", "data_index.json",
             "bad_images.txt")


def holds_run(out_dir: str | os.PathLike) -> bool:
    """True when ``out_dir`` has a run's config, metrics or checkpoint."""
    return any(os.path.exists(os.path.join(out_dir, name)) for name in ("config.json", "metrics.jsonl", *LAST))


def describe_run(out_dir: str | os.PathLike) -> str:
    """One phrase naming the run in ``out_dir``: its last logged step and when it was written."""
    metrics = Path(out_dir) / "metrics.jsonl"
    step = None
    if metrics.is_file():
        lines = [line for line in metrics.read_text(errors="replace").splitlines() if line.strip()]
        for line in reversed(lines):
            try:
                step = int(json.loads(line)["step"])
                break
            except (ValueError, KeyError, TypeError):
                continue
    written = [p for p in (Path(out_dir) / name for name in ("metrics.jsonl", *LAST, "config.json")) if p.exists()]
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(max(p.stat().st_mtime for p in written))) if written \
        else "?"
    return f"a run at step {step}, last written {when}" if step is not None else f"a run last written {when}"


def _move_aside(out_dir: Path) -> Path:
    dest = out_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    suffix = 1
    while dest.exists():
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{suffix}")
        suffix += 1
    dest.mkdir(parents=True)
    for pattern in RUN_FILES:
        for p in sorted(glob.glob(str(out_dir / pattern))):
            shutil.move(p, dest / os.path.basename(p))
    return dest


def check_out_dir(out_dir: str | os.PathLike, flag: str = "--out-dir") -> Path:
    """``out_dir`` as a Path, after checking it is a folder or can become one (not a file, writable)."""
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {p} is an existing file, not a folder: name a folder")
    parent = p if p.exists() else next((q for q in p.absolute().parents if q.exists()), None)
    if parent is None or not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {p}: {parent} is not writable")
    return p


def check_output_file(path: str | os.PathLike, suffixes: tuple[str, ...], flag: str = "--out") -> Path:
    """``path`` as a Path, after checking, before any work, that a file can be written there: its extension is
    one of ``suffixes``, it is not a folder, and its folder exists or can be made and is writable."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {p} is a folder; name a file inside it (e.g. {p / ('out' + suffixes[0])})")
    if p.suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {p}: unknown file type {p.suffix or '(no extension)'!r}; use one of "
                         f"{', '.join(suffixes)} (e.g. {p.with_suffix(suffixes[0]).name})")
    check_out_dir(p.parent if str(p.parent) else ".", flag=f"{flag} {p}: folder")
    return p


def prepare_run_dir(out_dir: str | os.PathLike, *, resume: str | None, overwrite: bool,
                    is_main: bool = True) -> Path | None:
    """Decide what happens to an existing run in ``out_dir`` before anything is written there.

    * a fresh folder (or no run in it): nothing to do;
    * ``resume`` given (``"auto"`` or a checkpoint): the run is continued, its files kept;
    * ``overwrite``: the earlier run's files move to ``previous/<time>/`` (on the main process only);
      returns that folder;
    * otherwise :class:`RunExistsError`, naming the run and the two ways on.
    """
    p = check_out_dir(out_dir)
    if resume is not None and resume != "auto" and not os.path.exists(resume):
        raise MissingFileError(f"checkpoint not found: {resume!r} (looked at {os.path.abspath(resume)}; --resume)")
    if not holds_run(p) or resume is not None:
        return None
    if not overwrite:
        raise RunExistsError(
            f"{p} already holds {describe_run(p)}. Continue it with --resume auto, or start a new run there with "
            f"--overwrite (its files move to {p / 'previous'}/, nothing is deleted), or pick another --out-dir")
    return _move_aside(p) if is_main else None


def clean_stale_files(out_dir: str | os.PathLike) -> list[str]:
    """Remove what a save killed mid-way leaves in ``out_dir``; finish a sharded save that was cut between
    its two renames (``last.dcp`` moved to ``.last.dcp.old``, the new one not yet in place). Returns what
    was removed or restored."""
    p = Path(out_dir)
    done = []
    for name in (n for n in LAST if n.endswith(".dcp")):
        old, final = p / f".{name}.old", p / name
        if old.is_dir() and not final.exists():
            os.replace(old, final)
            done.append(f"restored {final} from {old.name}")
    for stale in sorted(glob.glob(str(p / ".*.tmp")) + glob.glob(str(p / ".*.old"))):
        if os.path.isdir(stale):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
        done.append(f"removed {stale}")
    return done
