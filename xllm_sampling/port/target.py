"""The target repository, through GitPython's ``repo.git``; every Repo is closed after use.

State lives in the commits' trailers (``Step:`` and ``Reverts-Step:``) and in a small folder
``.git/xllm_port/`` (the state file, the flags file, the gates' records), never in the work tree.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Iterator

import git

from .errors import StepFailed, UsageError

BRANCH = "feat/sampler_optim"
_TRAILER = re.compile(r"^(Step|Reverts-Step): (\S+)$", re.M)


@contextlib.contextmanager
def open_repo(path: str | Path, writable: bool = False) -> Iterator[git.Repo]:
    """Open the target repository at ``path`` (its top level), or raise a :class:`UsageError`.

    With ``writable`` the work tree and ``.git`` must be writable by this user."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"target {path}: no such directory")
    try:
        repo = git.Repo(path)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise UsageError(f"target {path}: not a git repository (run `git init` there, commit your engine, then retry)") from None
    try:
        if repo.bare or repo.working_tree_dir is None:
            raise UsageError(f"target {path}: a bare repository has no work tree to patch: clone it and use the clone")
        if Path(repo.working_tree_dir).resolve() != path.resolve():
            raise UsageError(f"target {path}: not the top of its git repository ({repo.working_tree_dir})")
        if writable:
            for folder in (path, Path(repo.git_dir)):
                if not os.access(folder, os.W_OK | os.X_OK):
                    raise UsageError(f"target {path}: {folder} is not writable by this user: fix its permissions")
        yield repo
    finally:
        repo.close()


def state_dir(repo: git.Repo) -> Path:
    """``.git/xllm_port/`` of the target."""
    folder = Path(repo.git_dir) / "xllm_port"
    folder.mkdir(exist_ok=True)
    return folder


def flags_file(repo: git.Repo) -> Path:
    """The target's flags file, read by its processes through ``XLLM_SAMPLING_FLAGS_FILE``."""
    return state_dir(repo) / "flags.toml"


def changed_paths(repo: git.Repo) -> list[str]:
    """Paths that differ from HEAD in the index or the work tree, untracked files included, with
    every git setting that changes ``status`` output pinned."""
    out = repo.git.status("--porcelain=v1", "-z", "--untracked-files=all", "--ignore-submodules=none",
                          "--no-renames")
    return [entry[3:] for entry in out.split("\0") if entry]


def require_ready(repo: git.Repo, branch: str) -> None:
    """Refuse an unborn or wrong branch and a dirty work tree (untracked files included)."""
    root = repo.working_tree_dir
    if not repo.head.is_valid():
        raise UsageError(f"target {root} has no commit yet: commit your engine first "
                         f"(git -C {root} add -A && git -C {root} commit -m engine), then "
                         f"`git -C {root} checkout -b {branch}`")
    try:
        current = repo.active_branch.name
    except TypeError:
        current = "a detached HEAD"
    if current != branch:
        exists = branch in [h.name for h in repo.heads]
        fix = f"git -C {root} checkout {branch}" if exists else f"git -C {root} checkout -b {branch}"
        raise UsageError(f"target is on {current}, not {branch}: run `{fix}`")
    changed = changed_paths(repo)
    if changed:
        raise UsageError(f"target work tree is dirty ({len(changed)} paths, e.g. {changed[0]}): commit or stash first")


def patch_paths(repo: git.Repo, patch: Path) -> list[str]:
    """The paths a patch touches (created, modified or deleted), from ``git apply --numstat``."""
    try:
        out = repo.git.apply("--numstat", "-z", str(patch))
    except git.GitCommandError as e:
        raise StepFailed(f"patch {patch.name} cannot be read: {last_line(e)}") from None
    return [entry.split("\t", 2)[2] for entry in out.split("\0") if entry.count("\t") >= 2]


def applied_steps(repo: git.Repo) -> dict[str, str]:
    """Steps applied on HEAD and not reverted since, in the order applied: name -> commit sha."""
    applied: dict[str, str] = {}
    if not repo.head.is_valid():
        return applied
    for line in repo.git.log("--reverse", "--format=%H%x00%B%x1e").split("\x1e"):
        if "\x00" not in line:
            continue
        sha, body = line.strip().split("\x00", 1)
        for kind, name in _TRAILER.findall(body):
            if kind == "Step":
                applied[name] = sha
            else:
                applied.pop(name, None)
    return applied


def apply_patch(repo: git.Repo, patch: Path) -> str:
    """``git apply --check`` then ``--index``; if the check fails, ``--3way --index``. Returns the mode used."""
    try:
        repo.git.apply("--check", str(patch))
        repo.git.apply("--index", str(patch))
        return "clean"
    except git.GitCommandError:
        pass
    try:
        repo.git.apply("--3way", "--index", str(patch))
        return "3way"
    except git.GitCommandError as e:
        raise StepFailed(f"patch {patch.name} does not apply: {last_line(e)}") from None


def commit_paths(repo: git.Repo, sha: str) -> list[str]:
    """The paths commit ``sha`` changed."""
    return [p for p in repo.git.diff_tree("--no-commit-id", "--name-only", "-r", "-z", sha).split("\0") if p]


def revert(repo: git.Repo, sha: str) -> None:
    """Apply the reverse of commit ``sha`` to the index and work tree; conflicts raise :class:`StepFailed`."""
    try:
        repo.git.revert("--no-commit", sha)
    except git.GitCommandError as e:
        raise StepFailed(f"revert of {sha[:10]} conflicts: {last_line(e)}") from None
    finally:  # forget the revert in progress (it forbids committing only the step's paths)
        with contextlib.suppress(git.GitCommandError):
            repo.git.revert("--quit")


def read_state(repo: git.Repo) -> dict:
    """The state file: each step's last verification."""
    path = state_dir(repo) / "state.json"
    return json.loads(path.read_text()) if path.exists() else {"steps": {}}


def write_state(repo: git.Repo, state: dict) -> None:
    """Replace the state file atomically."""
    path = state_dir(repo) / "state.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def last_line(error: git.GitCommandError) -> str:
    text = (error.stderr or str(error)).strip().splitlines()
    return text[-1].strip() if text else str(error)
