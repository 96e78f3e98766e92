"""Atomic file and directory writes: a crash never leaves a half-written output, and an output folder
is replaced only when flip wrote it.

**Files** are written to a temporary sibling, then ``os.replace``-d into place (atomic on POSIX).

**Directories** (:func:`atomic_dir`) are built in a temporary sibling ``.<name>.<pid>.<random>.tmp``;
when the body has finished, the marker file ``.flip-output`` (``{"stage": ...}``: deterministic, so
DVC's hash of the output stays the same across reruns) is written into it, and it takes the place of
``<name>``: in one atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``), after which the temporary
name holds the old contents and is removed; or, where the exchange is not supported, in two renames
(``<name>`` → ``.<name>.old-<pid>``, temporary → ``<name>``), then the old folder is removed.

An existing, non-empty ``<name>`` is replaced only if it holds the marker of the same stage, or (a
folder written by an older version, without the marker) only files of the stage's known layout;
anything else is refused (:class:`OutputInUse`, exit 2) before the stage does any work, so
``flip drift --out reports`` never deletes ``reports/metrics.json``.

The states a crash (kill -9, power loss) can leave, and what :func:`recover_dir` (run on entry to
every :func:`atomic_dir`) does with them; a pid is *dead* when no such process runs (or it is this
process and the folder is not one of its writes in progress):

====================================================  =============================================
left behind                                           recovery
====================================================  =============================================
``<name>`` intact + a temporary of a dead pid         remove the temporary (the body did not finish,
(crash in the body, or before the swap)               or its commit never started)
``<name>`` new + a temporary of a dead pid holding    remove it (the exchange was done: the new
the old contents (crash after the exchange)           output is in place)
``<name>`` missing + ``.<name>.old-<pid>`` + that     finish the swap: the temporary becomes
pid's temporary with the marker (crash between the    ``<name>``, the old folder is removed
two renames)
``<name>`` missing + ``.<name>.old-<pid>`` only       roll back: the old folder becomes ``<name>``
``<name>`` new + ``.<name>.old-<pid>`` (crash after   remove the old folder
the second rename, or while removing the old one)
====================================================  =============================================

So after a crash at any point, the next write to (or :func:`recover_dir` of) ``<name>`` finds it
complete, old or new, and no ``.old-*`` or temporary folder of a dead process is left.

:func:`crash_point` is the test hook: ``FLIP_CRASH_AT=<point>`` kills the process with SIGKILL there.

The results have the permissions a plain ``open``/``mkdir`` would give under the user's umask
(``mkstemp`` and ``mkdtemp`` create 0600 files and 0700 directories, which a team's shared workspace
cannot read).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from flip.errors import FlipError

MARKER = ".flip-output"  # in every folder atomic_dir writes: {"stage": "<the stage that wrote it>"}
CRASH_ENV = "FLIP_CRASH_AT"


class OutputInUse(FlipError):
    """The output folder holds files that the stage did not write: replacing it would delete them."""


def crash_point(name: str) -> None:
    """Test hook: die here, as a kill -9 or a power cut would (SIGKILL: no clean-up, no ``finally``),
    when ``FLIP_CRASH_AT`` names this point (one name, or several separated by commas). The one crash
    hook of the project: the atomic swap here, the promotion steps in :mod:`flip.deploy.registry`."""
    if name in os.environ.get(CRASH_ENV, "").split(","):
        os.kill(os.getpid(), signal.SIGKILL)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists() and tmp_path.lstat().st_nlink == 1:  # (a hard link keeps its source's mode)
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# ---------------------------------------------------------------------------------------- folders
_IN_USE: set[str] = set()  # this process's temporary and old folders of writes in progress


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, stage: str = "flip", known: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``path`` as a whole (with the marker
    of ``stage`` in it). ``path`` must be absent, empty, an earlier output of ``stage`` (its marker) or,
    for a folder written before the marker existed, hold only names matching the glob patterns
    ``known``; anything else raises :class:`OutputInUse` before the body runs."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        path = Path(os.path.abspath(path))
    known = tuple(known)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    check_replaceable(path, stage, known)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    _IN_USE.update((os.path.abspath(tmp), os.path.abspath(old)))
    swapped = False
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"stage": stage}) + "\n", encoding="utf-8")  # last: "complete"
        os.chmod(tmp, 0o777 & ~_umask())
        crash_point("atomic_dir:before-swap")
        check_replaceable(path, stage, known)  # again: the body may have run for hours
        if not os.path.lexists(path):
            os.replace(tmp, path)
        elif _exchange(tmp, path):  # tmp now holds the old contents
            crash_point("atomic_dir:after-swap")
        else:
            if os.path.lexists(old):  # left by an earlier write of this process that could not remove it
                _remove(old)
            os.replace(path, old)
            try:
                crash_point("atomic_dir:between-renames")
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            swapped = True
            crash_point("atomic_dir:after-swap")
    finally:
        for leftover in (tmp, old) if swapped else (tmp,):
            if os.path.lexists(leftover):
                _remove(leftover)
        _IN_USE.difference_update((os.path.abspath(tmp), os.path.abspath(old)))


def check_replaceable(path: str | os.PathLike, stage: str, known: Iterable[str] = ()) -> None:
    """Raise :class:`OutputInUse` unless ``flip <stage>`` may replace the folder ``path`` (see
    :func:`atomic_dir`)."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise OutputInUse(f"{path} is a file, and flip {stage} writes a folder there (replacing what is there). "
                          "Fix: choose an empty or new folder.")
    entries = sorted(os.listdir(path))
    if not entries:
        return
    wrote = marker_stage(path)
    if wrote == stage:
        return
    if wrote is not None:
        raise OutputInUse(f"{path} holds the output of flip {wrote}; flip {stage} replaces its output folder as "
                          f"a whole and would delete it. Fix: choose an empty or new folder.")
    foreign = [e for e in entries if e != MARKER and not any(fnmatch.fnmatchcase(e, k) for k in known)]
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise OutputInUse(f"{path} holds files that flip {stage} did not write: {shown}; flip {stage} replaces "
                          f"its output folder as a whole and would delete them. Fix: choose an empty or new folder.")


def marker_stage(path: str | os.PathLike) -> str | None:
    """The stage named by the marker in folder ``path`` (None: no readable marker)."""
    try:
        stage = json.loads((Path(path) / MARKER).read_text(encoding="utf-8")).get("stage")
    except (OSError, ValueError, AttributeError):
        return None
    return stage if isinstance(stage, str) else None


def recover_dir(path: str | os.PathLike) -> str:
    """Bring ``path`` back to a complete state after a crashed :func:`atomic_dir` write (the table in
    the module docstring). Returns what was done: "" (nothing), "finished the swap", "rolled back" or
    "removed leftovers"."""
    path = Path(path)
    temps, olds = _leftovers(path)
    done = ""
    if olds and not os.path.lexists(path):
        old = max(olds, key=lambda p: p.lstat().st_ctime)
        complete = sorted((t for t, pid in temps.items() if pid == olds[old] and (t / MARKER).is_file()),
                          key=lambda p: p.lstat().st_ctime)
        if complete:  # the process died between its two renames: its new output was complete
            os.replace(complete[-1], path)
            del temps[complete[-1]]
            done = "finished the swap"
        else:
            os.replace(old, path)
            del olds[old]
            done = "rolled back"
    for leftover in (*temps, *olds):
        _remove(leftover)
        done = done or "removed leftovers"
    return done


def _leftovers(path: Path) -> tuple[dict[Path, int], dict[Path, int]]:
    """The temporary and old folders of ``path`` whose process is dead: ``{folder: pid}`` each."""
    name = re.escape(path.name)
    patterns = (re.compile(rf"\.{name}\.(\d+)\.[a-z0-9_]+\.tmp"), re.compile(rf"\.{name}\.old-(\d+)"))
    found: tuple[dict[Path, int], dict[Path, int]] = ({}, {})
    try:
        entries = os.listdir(path.parent)
    except FileNotFoundError:
        return found
    for entry in entries:
        for pattern, into in zip(patterns, found):
            m = pattern.fullmatch(entry)
            if m and _dead(int(m.group(1)), path.parent / entry):
                into[path.parent / entry] = int(m.group(1))
    return found


def _dead(pid: int, folder: Path) -> bool:
    """No live process ``pid`` is writing ``folder`` (this process: not one of its writes in progress;
    a container's rerun may well get the pid of the process that crashed)."""
    if pid == os.getpid():
        return os.path.abspath(folder) not in _IN_USE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # (EPERM: another user's live process)
        return False
    try:  # a zombie (killed, not yet reaped by its parent) is dead too
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _remove(path: Path) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the system or file system cannot (the caller then renames twice)."""
    import ctypes

    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.cache
def _renameat2() -> Any:
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or glibc < 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


# ------------------------------------------------------------------------------------------- JSON
def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as pretty JSON, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_default) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, memoised per (path, size, mtime) within the process."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
        _HASH_MEMO[key] = h.hexdigest()
    return _HASH_MEMO[key]


def malloc_trim() -> Any:
    """glibc's ``malloc_trim`` (a no-op elsewhere): call it as ``trim(0)`` between the chunks of a
    loop over large short-lived frames or tensors, whose freed memory glibc's heap otherwise keeps
    (``flip predict``: 0.5-3.5 GB peak RSS between identical runs without it; ``flip validate``'s
    pandera chunks: see flip/data/schemas.py)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda *_: None
