"""Every change the driver makes to a target goes through one :class:`Transaction`.

A transaction holds the target's lock for the whole command and, for each step (an apply or a
revert), writes a journal *before* touching anything: the paths the step will change and each
path's content before (HEAD's blob, or absent). After the change it records each path's content
as the step left it. Whatever then goes wrong (a failed check, an exception, SIGINT or SIGTERM,
or a crash or SIGKILL seen by the next run), :meth:`Transaction.restore` puts back exactly the
step's own changes:

* a step path still holding the step's content is restored to HEAD (or removed if it is new);
* a step path the user edited meanwhile is left as the user left it, and named;
* every other file in the target, tracked, untracked or ignored, is never touched.

The lock is an ``flock`` on ``.git/xllm_port/lock``: the kernel releases it when the holder
exits in any way, so a crash never leaves a stale lock. The file names the holder.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import signal
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import git

from . import target
from .errors import PortError, StepFailed


class Busy(PortError):
    """Another xllm-port command holds the target's lock: exit code 2."""

    exit_code = 2


def blob_sha(path: Path) -> str | None:
    """Git's blob id of the file at ``path`` (None when absent), computed without spawning git."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Journal:
    """What one step is changing: written before the change, removed after the commit."""

    step: str
    action: str  # apply | revert
    head: str  # HEAD before the step
    phase: str  # changing | checking | committing
    before: dict[str, str | None]  # path -> blob sha at HEAD, None = absent
    after: dict[str, str | None] = field(default_factory=dict)  # path -> blob sha the step left
    children: list[int] = field(default_factory=list)  # process groups of running checks
    started: str = ""


class Transaction:
    """The lock of one target plus the journal of the step in progress."""

    def __init__(self, repo: git.Repo, command: str):
        self.repo = repo
        self.root = Path(repo.working_tree_dir)
        self.folder = target.state_dir(repo)
        self.command = command
        self._lock_fd: int | None = None
        self.journal: Journal | None = None

    # -- the lock --------------------------------------------------------------------------
    def __enter__(self) -> Transaction:
        fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Busy(f"target {self.root} is locked by {holder}: wait for it to finish") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} (xllm-port {self.command}, since {_now()})\n".encode(), 0)
        self._lock_fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the journal -----------------------------------------------------------------------
    @property
    def _journal_path(self) -> Path:
        return self.folder / "journal.json"

    def _save(self) -> None:
        tmp = self._journal_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.journal), indent=2) + "\n")
        os.replace(tmp, self._journal_path)

    def begin(self, step: str, action: str, paths: list[str]) -> None:
        """Record the step's paths and their content at HEAD, before anything changes."""
        head = self.repo.head.commit
        before = {}
        for p in paths:
            try:
                before[p] = head.tree[p].hexsha
            except KeyError:
                before[p] = None
        self.journal = Journal(step, action, head.hexsha, "changing", before, started=_now())
        self._save()

    def changed(self) -> None:
        """Record the content the step left in each of its paths; the checks come next."""
        self.journal.after = {p: blob_sha(self.root / p) for p in self.journal.before}
        self.journal.phase = "checking"
        self._save()

    def child(self, pgid: int | None) -> None:
        """Record (or with None, forget) the process group of a running check."""
        self.journal.children = [pgid] if pgid else []
        self._save()

    def edited_by_user(self) -> list[str]:
        """Step paths whose content is no longer what the step left (someone edited them)."""
        return [p for p, sha in self.journal.after.items() if blob_sha(self.root / p) != sha]

    def commit(self, message: str) -> str:
        """Commit the step's own paths (and nothing the user staged meanwhile); ends the journal."""
        edited = self.edited_by_user()
        if edited:
            raise StepFailed(f"{self.journal.step}: {', '.join(edited)} changed while the checks ran: "
                             "not committed (your edits are kept)")
        self.journal.phase = "committing"
        self._save()
        try:
            self.repo.git.commit("-q", "--no-verify", "-m", message, "--", *self.journal.before)
        except git.GitCommandError as e:
            raise StepFailed(f"git commit failed: {target.last_line(e)}") from None
        sha = self.repo.head.commit.hexsha
        self.end()
        return sha

    def end(self) -> None:
        """The step is complete: forget its journal."""
        self.journal = None
        with contextlib.suppress(FileNotFoundError):
            self._journal_path.unlink()

    def pending(self) -> Journal | None:
        """The journal an interrupted run left behind, if any."""
        try:
            return Journal(**json.loads(self._journal_path.read_text()))
        except FileNotFoundError:
            return None

    def restore(self) -> list[str]:
        """Undo the step in progress (this run's or an interrupted run's): see the module docstring.

        Returns the step paths left alone because the user edited them."""
        journal = self.journal or self.pending()
        if journal is None:
            return []
        self.journal = journal
        with _signals_ignored():
            return self._restore(journal)

    def _restore(self, journal: Journal) -> list[str]:
        for pgid in journal.children:
            _kill_group(pgid)
        head = self.repo.head.commit
        if head.hexsha != journal.head and head.parents and head.parents[0].hexsha == journal.head \
                and f"{'Step' if journal.action == 'apply' else 'Reverts-Step'}: {journal.step}" in head.message:
            self.end()  # interrupted after its commit: the step is complete
            return []
        kept = []
        for p, before in journal.before.items():
            now = blob_sha(self.root / p)
            if now == before:
                continue
            # While the step was changing the tree, whatever differs from HEAD is the step's.
            if journal.phase != "changing" and now != journal.after[p]:
                kept.append(p)  # the user edited it after the step: theirs now
                continue
            if before is None:
                (self.root / p).unlink(missing_ok=True)
                _remove_empty_parents(self.root / p, self.root)
            else:
                self.repo.git.checkout(journal.head, "--", p)
        paths = list(journal.before)
        if paths:
            self.repo.git.reset("-q", journal.head, "--", *paths)
        self.end()
        return kept


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _remove_empty_parents(path: Path, root: Path) -> None:
    parent = path.parent
    while parent != root and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def _kill_group(pgid: int) -> None:
    """Kill a check's process group left running by a crashed driver (only if it is still a pytest)."""
    try:
        cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes()
    except OSError:
        return
    if b"pytest" in cmdline:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


@contextlib.contextmanager
def _signals_ignored():
    """A restore runs to its end: SIGINT, SIGTERM and SIGHUP wait (in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


class Interrupted(BaseException):
    """SIGTERM (or SIGHUP) arrived: unwind like KeyboardInterrupt, restoring on the way."""


def signal_name(interrupt: BaseException) -> str:
    """The signal behind a KeyboardInterrupt or an :class:`Interrupted`."""
    return "SIGINT" if isinstance(interrupt, KeyboardInterrupt) else str(interrupt)


@contextlib.contextmanager
def interruptible():
    """Turn SIGTERM and SIGHUP into :class:`Interrupted` so that ``finally`` blocks restore the target."""
    def handler(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    saved = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
