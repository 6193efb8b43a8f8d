"""The target repository, through GitPython's ``repo.git``; every Repo is closed after use.

State lives in the commits' trailers (``Step:`` and ``Reverts-Step:``) and in a small folder
``.git/xllm_port/`` (the state file, the flags file, the gates' records), never in the work tree.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Iterator

import git

from .errors import StepFailed, UsageError

BRANCH = "feat/sampler_optim"
_TRAILER = re.compile(r"^(Step|Reverts-Step): (\S+)$", re.M)


@contextlib.contextmanager
def open_repo(path: str | Path) -> Iterator[git.Repo]:
    """Open the target repository at ``path`` (its top level), or raise a :class:`UsageError`."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"target {path}: no such directory")
    try:
        repo = git.Repo(path)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise UsageError(f"target {path}: not a git repository") from None
    try:
        if Path(repo.working_tree_dir).resolve() != path.resolve():
            raise UsageError(f"target {path}: not the top of its git repository ({repo.working_tree_dir})")
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


def require_ready(repo: git.Repo, branch: str) -> None:
    """Refuse a wrong branch or a dirty work tree (untracked files included)."""
    try:
        current = repo.active_branch.name
    except TypeError:
        current = "a detached HEAD"
    if current != branch:
        raise UsageError(f"target is on {current}, not {branch}: run `git -C {repo.working_tree_dir} checkout {branch}`")
    if repo.is_dirty(untracked_files=True):
        changed = repo.git.status("--porcelain").splitlines()
        raise UsageError(f"target work tree is dirty ({len(changed)} paths, e.g. {changed[0].strip()}): commit or stash first")


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
        raise StepFailed(f"patch {patch.name} does not apply: {_last_line(e)}") from None


def restore(repo: git.Repo, head: str) -> None:
    """Put the index and work tree back at ``head`` and remove files the step created."""
    repo.git.reset("--hard", head)
    repo.git.clean("-fd")


def commit(repo: git.Repo, message: str) -> str:
    """Commit the index with ``message``; returns the new commit's sha."""
    try:
        repo.git.commit("-q", "--no-verify", "-m", message)
    except git.GitCommandError as e:
        raise StepFailed(f"git commit failed: {_last_line(e)}") from None
    return repo.head.commit.hexsha


def revert(repo: git.Repo, sha: str, message: str) -> str:
    """Revert commit ``sha`` as a new commit with ``message``; conflicts raise :class:`StepFailed`."""
    try:
        repo.git.revert("--no-commit", sha)
    except git.GitCommandError as e:
        raise StepFailed(f"revert of {sha[:10]} conflicts: {_last_line(e)}") from None
    return commit(repo, message)


def read_state(repo: git.Repo) -> dict:
    """The state file: each step's last verification."""
    path = state_dir(repo) / "state.json"
    return json.loads(path.read_text()) if path.exists() else {"steps": {}}


def write_state(repo: git.Repo, state: dict) -> None:
    path = state_dir(repo) / "state.json"
    path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def _last_line(error: git.GitCommandError) -> str:
    text = (error.stderr or str(error)).strip().splitlines()
    return text[-1].strip() if text else str(error)
