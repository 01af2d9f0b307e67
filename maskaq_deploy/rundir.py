"""Run folders: one writer at a time, and a new run never destroys the old one before it is complete.

    runs/.x.lock      advisory lock of runs/x (flock: released on exit, and by the kernel when the holder dies);
                      holds the holder's pid and command so a refused command can name it
    runs/.x.partial   the run being written; renamed over runs/x only when the command succeeds, kept after a
                      failure only when it holds calibration work that --resume can continue
    runs/.x.replaced  the previous run during the swap (two renames); a swap cut between them is undone on the
                      next command

Rules (checked before anything is written): a non-empty folder is replaced only with --force and only when it
is a run of this tool (it has its manifest); --resume continues the interrupted run of the folder, or the run in
it, and refuses a folder that is not a run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from maskaq_deploy import layout
from maskaq_deploy.errors import OutputExistsError, RunLockedError, UsageError
from maskaq_deploy.layout import lock_path, replaced_path, staging_path  # noqa: F401  (rundir's own vocabulary)

# fd and re-entry count of every lock this process holds, by resolved folder: pipeline functions lock the folder
# too, so a command that already holds it must not lock itself out.
_held: dict[Path, list] = {}


@dataclass(frozen=True)
class Stage:
    """A run being written: ``path`` is the folder the stages write into, ``out`` the run folder it replaces when
    the command succeeds. One command opens one stage (``writing``) and hands it to every stage it runs."""

    out: Path
    path: Path


def _key(path) -> Path:
    return Path(os.path.abspath(path))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_run(folder) -> bool:
    """Whether ``folder`` is a run of this tool: a manifest this tool wrote, or the state of a calibration that
    was interrupted before its manifest."""
    folder = Path(folder)
    manifest = _read_json(folder / layout.MANIFEST_FILE)
    if isinstance(manifest, dict) and "schema_version" in manifest and "recipe" in manifest:
        return True
    state = _read_json(folder / layout.DFQ_DIR / layout.DFQ_STATE_FILE)
    return isinstance(state, dict) and "fingerprint" in state


def holds_work(folder) -> bool:
    """Whether ``folder`` holds calibration work worth resuming: synthetic batches or a fine-tune checkpoint
    (observer calibration alone is cheap to redo, so a stage with only that is not kept)."""
    from maskaq_deploy.calib.dfq.state import holds_work as state_holds_work

    return state_holds_work(folder)


def check_writable(out) -> None:
    """Refuse, before any work, an output path that cannot be created: a parent that is a file, a read-only
    or unwritable folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"`out` {out} exists and is not a directory; choose another `out`")
    parent = Path(os.path.abspath(out)).parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"`out` {out}: {probe} is a file, not a folder; choose another `out`")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"`out` {out}: cannot write in {probe} (read-only or no permission); choose another `out`")


@contextlib.contextmanager
def locked(run, command: str | None = None) -> Iterator[None]:
    """Hold the advisory lock of run folder ``run`` (re-entrant within this process). A folder locked by another
    live process raises RunLockedError naming that process's pid and command."""
    key = _key(run)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    fd = _acquire(lock_path(key), command or " ".join(["maskaq-deploy", *sys.argv[1:]]))
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        _release(lock_path(key), fd)


def _acquire(path: Path, command: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _read_json(path) or {}
            raise RunLockedError(
                f"{layout.locked_folder(path)} is in use by pid {holder.get('pid', '?')} "
                f"({holder.get('command', 'command unknown')}); wait for it to finish or choose another folder"
            ) from None
        # the holder before us may have unlinked the file after we opened it: then our lock is on a dead inode
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    return fd


def _release(path: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        path.unlink()  # before unlocking: a waiting process then retries on a fresh file
    os.close(fd)


@contextlib.contextmanager
def writing(out, *, force: bool = False, resume: bool = False, command: str | None = None,
            main: bool = True) -> Iterator[Stage]:
    """Lock ``out``, check the force/resume rules, and yield the Stage to write the new run into: a folder
    beside ``out`` that replaces it only when the block ends without an error. ``main=False`` (the non-writing
    ranks of a multi-process job) yields the Stage and touches nothing."""
    out = Path(out)
    stage = staging_path(out)
    if not main:
        yield Stage(out, stage)
        return
    check_writable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(out, command):
        _recover(out)
        _prepare(out, stage, force=force, resume=resume)
        try:
            yield Stage(out, stage)
        except BaseException:
            if not holds_work(stage):
                shutil.rmtree(stage, ignore_errors=True)
            raise
        _swap(stage, out)


def _nonempty(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _prepare(out: Path, stage: Path, *, force: bool, resume: bool) -> None:
    """Check the rules and leave an empty (or resumable) stage; raises UsageError before anything is written."""
    if stage.exists() and not (resume or force):
        raise OutputExistsError(f"an interrupted run of {out} is waiting in {stage}; pass `resume` to continue it, "
                                "or `force` to discard it and start over")
    if _nonempty(out) and not is_run(out):
        if resume:
            raise UsageError(f"`resume`: {out} is not a run of maskaq-deploy (no {layout.MANIFEST_FILE}); give the "
                             "`out` of the run to continue")
        raise OutputExistsError(f"`out` {out} holds files that are not a maskaq-deploy run (no {layout.MANIFEST_FILE})"
                                f"{'; `force` replaces only runs' if force else ''}; choose another `out` or "
                                "empty it")
    if _nonempty(out) and not (force or resume):
        raise OutputExistsError(f"`out` {out} holds a run; pass `force` to replace it (it is kept until the new "
                                "run succeeds), `resume` to continue it, or choose another `out`")
    if stage.exists() and resume:
        return  # continue the interrupted run where it stopped
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    if resume and (out / layout.DFQ_DIR).is_dir():  # continue the finished batches of the run in ``out``
        shutil.copytree(out / layout.DFQ_DIR, stage / layout.DFQ_DIR, copy_function=_link_or_copy)


def _link_or_copy(src, dst):
    """Hard links: state files are only ever replaced by rename, never written in place, so sharing is safe."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _swap(stage: Path, out: Path) -> None:
    old = replaced_path(out)
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.rename(out, old)
    try:
        os.rename(stage, out)
    except OSError:
        if old.exists() and not out.exists():
            os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _recover(out: Path) -> None:
    """Finish what a swap cut short: the old run back in place when the new one never arrived."""
    old = replaced_path(out)
    if not old.exists():
        return
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(old, out)


def relative_paths(summary: dict, run) -> None:
    """Store the file paths a calibration summary names relative to the run folder, so they stay right after
    the stage is renamed into place."""
    paths = summary.get("paths") if isinstance(summary, dict) else None
    if not isinstance(paths, dict):
        return
    root = Path(os.path.abspath(run))
    for key, value in paths.items():
        items = value if isinstance(value, list) else [value]
        rel = [os.path.relpath(os.path.abspath(v), root) if isinstance(v, str) and v else v for v in items]
        paths[key] = rel if isinstance(value, list) else rel[0]
