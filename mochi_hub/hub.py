"""Publish an exported folder (:func:`mochi_hub.export.export_backbone`) to the Hugging Face Hub.

The folder is checked first: it must be a mochi_hub export (``model.safetensors`` with
``format: pt`` metadata, ``config.json``, ``README.md``) and hold no pickle files (by suffix or by
content), since only safetensors weights are ever published, and nothing that reaches outside it
(a symbolic link pointing elsewhere, a name with ``..``). Every file then goes up in a single commit
(``HfApi.create_commit``), so a failed upload leaves the repository's files as they were. Transient
failures (connection errors, timeouts, HTTP 408/429/5xx) are retried with exponential back-off;
others (401, 403, 404, 400, ...) are raised at once.

The token comes from the argument, ``HF_TOKEN`` or ``hf auth login`` (``huggingface_hub.get_token``)
and is never printed, logged or written: it is replaced by ``***`` in any error raised from here.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import re
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects, validate_repo_id
from safetensors import SafetensorError, safe_open

from mochi_hub import __version__

__all__ = [
    "HUB_ERRORS",
    "REQUIRED_FILES",
    "PushResult",
    "UploadFile",
    "backoff_delay",
    "check_export",
    "check_repo_id",
    "check_revision",
    "is_transient",
    "parse_hub_ref",
    "plan_upload",
    "push_folder",
]

logger = logging.getLogger(__name__)

REQUIRED_FILES = ("model.safetensors", "config.json", "README.md")
# Pickle-based weight formats: never published (loading them runs arbitrary code). Any suffix of a
# name counts (``model.pth.tar``); files are also recognised by content (see ``_pickled``).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
HF_HUB_PREFIXES = ("hf-hub:", "hf_hub:")
MAX_NAME_LENGTH = 96  # of each part of a repo id (huggingface_hub.utils.validate_repo_id)
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,254}")
LOGIN_HINT = (
    "no Hugging Face token found: log in with `hf auth login`, or set the HF_TOKEN environment "
    "variable (a token with write access, https://huggingface.co/settings/tokens)"
)
_T = TypeVar("_T")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors of Python and of the HTTP client huggingface_hub uses."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (
        ("httpx2", ("TransportError",)),  # huggingface_hub >= 1.x
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),  # huggingface_hub < 1.0
    ):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(mod, name) for name in names if hasattr(mod, name)]
    return tuple(found)


TRANSIENT_ERRORS = _transport_errors()
# What a push raises when the Hub refuses or cannot be reached (the CLI reports these in one line).
HUB_ERRORS: tuple[type[BaseException], ...] = (HfHubHTTPError, *TRANSIENT_ERRORS)


@dataclasses.dataclass(frozen=True)
class UploadFile:
    """One file of the commit.

    Attributes:
        path: Its path in the repository (POSIX, relative to the folder).
        size: Its size in bytes.
        local: Its path on disk.
    """

    path: str
    size: int
    local: Path


@dataclasses.dataclass(frozen=True)
class PushResult:
    """What :func:`push_folder` uploaded, or would upload on a dry run.

    Attributes:
        repo_id: The repository.
        revision: The branch committed to (None: ``main``).
        files: The files of the commit, sorted by path.
        commit: The commit made; None on a dry run.
    """

    repo_id: str
    revision: str | None
    files: tuple[UploadFile, ...]
    commit: CommitInfo | None = None

    @property
    def dry_run(self) -> bool:
        """Whether nothing was uploaded."""
        return self.commit is None

    @property
    def total_bytes(self) -> int:
        """The size of all files together."""
        return sum(f.size for f in self.files)

    @property
    def commit_url(self) -> str | None:
        """The commit's URL on the Hub (None on a dry run)."""
        return None if self.commit is None else self.commit.commit_url

    @property
    def pr_url(self) -> str | None:
        """The pull request's URL when one was opened."""
        return None if self.commit is None else self.commit.pr_url


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a valid ``org/name`` model repository id.

    Raises:
        ValueError: If it is not (the message names the id and the rule it breaks).
    """
    if not isinstance(repo_id, str):
        raise ValueError(f"invalid repo id {repo_id!r}: expected a string 'org/name'")
    long = [part for part in repo_id.split("/") if len(part) > MAX_NAME_LENGTH]
    if long:
        raise ValueError(
            f"invalid repo id {repo_id!r}: {long[0][:20]!r}... is {len(long[0])} characters "
            f"long, at most {MAX_NAME_LENGTH} are allowed"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:  # its message quotes the id as is: keep it on one line
        raise ValueError(f"invalid repo id {repo_id!r}: {' '.join(str(e).split())}") from None
    if repo_id.count("/") != 1:
        raise ValueError(
            f"invalid repo id {repo_id!r}: expected 'org/name' (your user or organisation, a "
            "slash, and the model name)"
        )
    return repo_id


def check_revision(revision: str | None) -> str | None:
    """``revision`` if it is None or a plausible branch, tag, ``refs/pr/N`` or commit id.

    Raises:
        ValueError: If it is empty, has characters other than letters, digits, ``-``, ``_``,
            ``.`` and ``/``, or has ``..`` or an empty path component (``a//b``, ``/a``, ``a/``).
    """
    if revision is None:
        return None
    if (
        not isinstance(revision, str)
        or not _REVISION.fullmatch(revision)
        or ".." in revision
        or "//" in revision
        or revision.endswith(("/", ".", ".lock"))
    ):
        raise ValueError(
            f"invalid revision {revision!r}: expected a branch, tag or commit id (letters, "
            "digits, '-', '_', '.' and '/', no '..')"
        )
    return revision


def parse_hub_ref(ref: str) -> tuple[str, str | None]:
    """Split and check a Hub model reference ``[hf-hub:]org/name[@revision]``.

    Args:
        ref: The reference; an ``hf-hub:`` (or timm's older ``hf_hub:``) prefix is optional.

    Returns:
        ``(repo_id, revision)``; the revision is None when none is given.

    Raises:
        ValueError: If the repo id or the revision is invalid; the message names both ``ref``
            and what is wrong with it.
    """
    if not isinstance(ref, str):
        raise ValueError(f"invalid Hub reference {ref!r}: expected 'hf-hub:<org>/<name>'")
    text = ref
    for prefix in HF_HUB_PREFIXES:
        text = text.removeprefix(prefix)
    repo_id, at, revision = text.partition("@")
    try:
        check_repo_id(repo_id)
        check_revision(revision if at else None)
    except ValueError as e:
        raise ValueError(f"invalid Hub reference {ref!r}: {e}") from None
    return repo_id, (revision if at else None)


def _safetensors_format(path: Path) -> str | None:
    """The ``format`` entry of a safetensors file's metadata.

    Raises:
        ValueError: If the file is not a safetensors file.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None
    return metadata.get("format")


def _pickled(path: Path) -> str | None:
    """What pickle format ``path`` holds, judged by its content; None if it holds none.

    Recognises pickles of protocol 2 and later (``pickle.dump``, ``torch.save`` with the legacy
    format) and ``torch.save``'s zip archives (which wrap a ``data.pkl``).
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle"
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "a damaged zip archive (the torch.save format)"
        if any(name.endswith(".pkl") for name in names):
            return "a torch.save archive (zipped pickles)"
    return None


def _ignored(rel: str) -> bool:
    """Whether huggingface_hub never uploads ``rel`` (``.git``, ``.cache/huggingface``)."""
    return not list(filter_repo_objects([rel], ignore_patterns=DEFAULT_IGNORE_PATTERNS))


def _walk(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """The files a push of ``folder`` uploads, and the entries that make it unsafe to publish.

    Symbolic links are not followed: one is refused if it points out of the folder, to a
    directory or nowhere. Names with ``..``, a backslash or a control character are refused.

    Returns:
        ``({POSIX path relative to folder: path}, [description of each unsafe entry])``.
    """
    root = folder.resolve()
    files: dict[str, Path] = {}
    unsafe: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):  # does not descend into linked dirs
        base = Path(dirpath)
        here = base.relative_to(folder)
        dirnames[:] = [d for d in dirnames if not _ignored((here / d).as_posix())]
        for name in sorted(dirnames + filenames):
            path = base / name
            rel = path.relative_to(folder).as_posix()
            if _ignored(rel):
                continue
            if ".." in name or "\\" in name or not name.isprintable():
                unsafe.append(f"{rel!r} (a name with '..', a backslash or a control character)")
            elif path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(root):
                    unsafe.append(f"{rel} -> {os.readlink(path)} (a link out of the folder)")
                elif not target.is_file():
                    link = os.readlink(path)
                    unsafe.append(f"{rel} -> {link} (a link to a directory or to nothing)")
                else:
                    files[rel] = path
            elif name in filenames and path.is_file():
                files[rel] = path
    return dict(sorted(files.items())), unsafe


def _check(folder: str | Path) -> tuple[Path, dict[str, Path]]:
    """:func:`check_export`, also returning the files to upload."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a directory: push the folder written by `export`")
    files, unsafe = _walk(folder)
    if unsafe:
        raise ValueError(
            f"{folder} holds entries that reach outside it or have unsafe names: "
            f"{'; '.join(unsafe)}; nothing was uploaded (copy real files in, rename them)"
        )
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise ValueError(
            f"{folder} is not a mochi_hub export: missing {', '.join(missing)} "
            "(create one with `mochi-hub export`)"
        )
    pickles = []
    for rel, path in files.items():
        suffixes = [s.lower() for s in Path(rel).suffixes]
        if any(s in PICKLE_SUFFIXES for s in suffixes):
            pickles.append(rel)
        elif suffixes[-1:] == [".safetensors"]:
            _safetensors_format(path)  # a pickle named *.safetensors does not parse
        else:
            kind = _pickled(path)
            if kind:
                pickles.append(f"{rel} ({kind})")
    if pickles:
        raise ValueError(
            f"{folder} holds pickle files ({', '.join(pickles)}): only safetensors weights are "
            "published; remove them"
        )
    fmt = _safetensors_format(folder / "model.safetensors")
    if fmt != "pt":
        raise ValueError(
            f"{folder / 'model.safetensors'} has metadata format={fmt!r}, expected 'pt' "
            "(re-export it with `mochi-hub export`)"
        )
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / 'config.json'} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or not config.get("architecture"):
        raise ValueError(f"{folder / 'config.json'} names no timm 'architecture'")
    return folder, files


def check_export(folder: str | Path) -> Path:
    """``folder`` if it is a mochi_hub export that may be published.

    Args:
        folder: The folder written by ``mochi-hub export``.

    Returns:
        The folder as a Path.

    Raises:
        FileNotFoundError: If it does not exist.
        ValueError: If it is not a directory; holds a symbolic link pointing out of it (or to a
            directory, or nowhere) or a name with ``..``; lacks a required file; holds a pickle
            file (``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl``, ``*.pickle``, ``*.ckpt``,
            ``*.joblib``, by any suffix of its name, or any file whose content is a pickle or a
            ``torch.save`` archive); has a safetensors file that does not parse or a
            ``model.safetensors`` without ``format: pt`` metadata; or has a ``config.json``
            without an architecture.
    """
    return _check(folder)[0]


def plan_upload(folder: str | Path) -> tuple[UploadFile, ...]:
    """The files a push of ``folder`` commits, after checking it with :func:`check_export`.

    Every file under the folder, sorted, except what huggingface_hub never uploads (``.git``,
    ``.cache/huggingface``).
    """
    _, files = _check(folder)
    return tuple(UploadFile(rel, path.stat().st_size, path) for rel, path in files.items())


def _status(error: BaseException) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


def is_transient(error: BaseException) -> bool:
    """Whether retrying may help: a connection error, a timeout, or HTTP 408, 429 or 5xx.

    Offline mode (``HF_HUB_OFFLINE``), bad requests, authentication and permission errors and
    missing repositories are not transient.
    """
    if isinstance(error, OfflineModeIsEnabled):
        return False
    status = _status(error)
    if status is not None:
        return status in (408, 429) or 500 <= status < 600
    return isinstance(error, TRANSIENT_ERRORS)


def backoff_delay(
    attempt: int, *, base_delay: float, max_delay: float, error: BaseException | None = None
) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): ``base_delay * 2**attempt``, capped.

    A numeric ``Retry-After`` header on the error's response (HTTP 429/503) lengthens the wait.
    """
    delay = base_delay * 2**attempt
    headers = getattr(getattr(error, "response", None), "headers", None) or {}
    try:
        delay = max(delay, float(headers.get("retry-after", 0)))
    except (TypeError, ValueError):  # an HTTP date: keep the exponential delay
        pass
    return min(delay, max_delay)


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def _scrub(error: BaseException, secret: str | None) -> None:
    """Remove ``secret`` from the error's message, in place."""
    if not secret:
        return
    error.args = tuple(_redact(a, secret) if isinstance(a, str) else a for a in error.args)
    if isinstance(getattr(error, "server_message", None), str):
        error.server_message = _redact(error.server_message, secret)


def _with_retries(
    call: Callable[[], _T],
    what: str,
    *,
    max_retries: int,
    base_delay: float,
    max_delay: float,
    sleep: Callable[[float], Any],
    secret: str | None,
) -> _T:
    """``call()``, retried up to ``max_retries`` times while it fails transiently."""
    for attempt in range(max_retries + 1):
        try:
            return call()
        except Exception as e:
            if attempt == max_retries or not is_transient(e):
                raise
            delay = backoff_delay(attempt, base_delay=base_delay, max_delay=max_delay, error=e)
            reason = _redact(" ".join(str(e).split())[:200], secret)
            logger.warning(
                "%s failed (%s: %s); retry %d/%d in %.1f s",
                what,
                type(e).__name__,
                reason,
                attempt + 1,
                max_retries,
                delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    api: HfApi | None = None,
    max_retries: int = 5,
    base_delay: float = 1.0,
    max_delay: float = 60.0,
    sleep: Callable[[float], Any] = time.sleep,
) -> PushResult:
    """Upload an exported folder to a Hub model repository in one commit.

    The repository is created if needed (``exist_ok``), then the branch ``revision`` if it is given
    and is not ``main``, then one commit adds every file. Each step is retried on transient errors
    with exponential back-off; as the files go up in a single commit, a failure commits nothing.

    Args:
        folder: The folder written by ``mochi-hub export``.
        repo_id: ``org/name``.
        private: Create the repository private (ignored if it exists).
        revision: The branch to commit to (created from ``main`` if missing); None for ``main``.
        create_pr: Open a pull request with the commit instead of committing to the branch.
        dry_run: Only check the folder and id and list the files: no token, no network.
        token: A Hub token; by default ``HF_TOKEN`` or the ``hf auth login`` one.
        commit_message: The commit's title.
        api: The ``HfApi`` to call (a fresh one by default).
        max_retries: Retries of each call after a transient failure.
        base_delay: Seconds before the first retry; doubled each time.
        max_delay: The longest wait between attempts.
        sleep: Waits between attempts (``time.sleep``).

    Returns:
        The files, and the commit (its URL, and the pull request's) unless on a dry run.

    Raises:
        FileNotFoundError: If the folder does not exist.
        ValueError: If the folder is not a publishable export (see :func:`check_export`), the
            repo id or the revision is invalid, or there is no token.
        huggingface_hub.errors.HfHubHTTPError: If the Hub refuses (after the retries, when
            transient); the token is redacted from its message.
    """
    files = plan_upload(folder)
    repo_id = check_repo_id(repo_id)
    revision = check_revision(revision)
    if dry_run:
        return PushResult(repo_id, revision, files)
    token = token or get_token()
    if not token:
        raise ValueError(LOGIN_HINT)
    api = api if api is not None else HfApi()
    message = commit_message or f"Upload {Path(folder).resolve().name} with mochi_hub {__version__}"
    retry = dict(max_retries=max_retries, base_delay=base_delay, max_delay=max_delay, sleep=sleep)

    def commit() -> CommitInfo:
        ops = [CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(f.local)) for f in files]
        return api.create_commit(  # fresh operations each attempt: create_commit mutates them
            repo_id,
            ops,
            commit_message=message,
            token=token,
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
        )

    target = f"{repo_id}@{revision or 'main'}"
    total = sum(f.size for f in files)
    logger.info("pushing %d files (%d bytes) to %s", len(files), total, target)
    try:
        _with_retries(
            lambda: api.create_repo(
                repo_id, token=token, private=private, exist_ok=True, repo_type="model"
            ),
            "create_repo",
            secret=token,
            **retry,
        )
        if revision and revision != "main" and not revision.startswith("refs/pr/"):
            _with_retries(
                lambda: api.create_branch(
                    repo_id, branch=revision, token=token, repo_type="model", exist_ok=True
                ),
                "create_branch",
                secret=token,
                **retry,
            )
        info = _with_retries(commit, "create_commit", secret=token, **retry)
    except Exception as e:
        _scrub(e, token)
        raise
    logger.info("pushed %s: %s", target, info.commit_url)
    return PushResult(repo_id, revision, files, info)
