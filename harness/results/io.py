"""Reading and writing result files: one atomic writer, one reader that names what is wrong.

Every file the runner writes (results, checkpoints, weights, FID caches, sample grids) goes through
:func:`atomic_write_bytes`: a temporary file unique to the writer in the same folder, flushed and
synced, then renamed over the target, so a reader sees the old file or the new one, never half of
one. A result is rewritten after every measurement, so a crash loses nothing already measured.
A write that finds the disk full (or the quota spent) removes its temporary file and raises
:class:`DiskFull`, one line naming the file; the file it was to replace is left as it was.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trilemma.contract.errors import TrilemmaError
from trilemma.results.schema import OLD_SCHEMAS, RESULT_FILE, SCHEMA, STATUS_RUNNING, STATUSES, migrate


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # the disk is full, or the user's quota on it spent


class DiskFull(TrilemmaError):
    """A write that found no space left: the suite stops (exit status 2), nothing half-written stays."""

    @classmethod
    def writing(cls, path: Path, error: OSError) -> "DiskFull":
        reason = "no space left on device" if error.errno == errno.ENOSPC else "disk quota exceeded"
        kept = "the previous file is intact" if Path(path).exists() else "nothing was written"
        return cls(f"{reason} writing {path}: {kept}; free some space and run again to resume")


def no_space(error: BaseException) -> bool:
    """Whether ``error`` is an OSError for a full disk or a spent quota."""
    return isinstance(error, OSError) and error.errno in NO_SPACE


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (see the module docstring)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        if no_space(e):
            raise DiskFull.writing(path, e) from None
        raise
    try:
        _write(fd, data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if no_space(e):
            raise DiskFull.writing(path, e) from None
        raise


def _write(fd: int, data: bytes) -> None:
    """Write ``data`` to the open file ``fd``, flushed and synced to the disk, and close it."""
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON (numpy/torch scalars and paths converted), written atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(obj: Any):
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def read_json(path: Path) -> Any:
    """A JSON file, or a TrilemmaError naming the file and what is wrong with it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrilemmaError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrilemmaError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def read_result(run_dir: Path) -> dict[str, Any] | None:
    """The result document of a run folder, None when it has none; a TrilemmaError when it is not one."""
    path = Path(run_dir) / RESULT_FILE
    if not path.exists():
        return None
    result = read_json(path)
    if not isinstance(result, dict) or result.get("schema") not in (SCHEMA, *OLD_SCHEMAS):
        found = result.get("schema") if isinstance(result, dict) else type(result).__name__
        raise TrilemmaError(f"{path}: not a trilemma result (schema {found!r}, expected {SCHEMA!r})")
    # The fields every reader relies on: a result without them is as unreadable as a torn file.
    for key, kind, allowed in (("config", dict, "a mapping"), ("measurements", dict, "a mapping"),
                               ("status", str, " or ".join(map(repr, STATUSES)))):
        value = result.get(key)
        if not isinstance(value, kind) or (key == "status" and value not in STATUSES):
            raise TrilemmaError(f"{path}: not a complete trilemma result ('{key}' must be {allowed}, got "
                                f"{'nothing' if key not in result else repr(value)[:40]})")
    return migrate(result)


def load_results(suite_dir: Path) -> list[dict[str, Any]]:
    """Every result under ``results/<suite>/``, sorted by run name."""
    suite_dir = Path(suite_dir)
    if not suite_dir.is_dir():
        raise TrilemmaError(f"{suite_dir} is not a results folder")
    return [r for d in sorted(suite_dir.iterdir()) if d.is_dir() and (r := read_result(d))]


def config_hash(config: dict[str, Any]) -> str:
    """Stable hash of a resolved run config: a run is redone only when this changes."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_result(suite: str, run: str, config: dict[str, Any], model_info: dict[str, Any],
               prov: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "suite": suite,
        "run": run,
        "status": STATUS_RUNNING,
        "config_hash": config_hash(config),
        "config": config,
        "model": model_info,
        "measurements": {},
        "curve": [],
        "provenance": prov,
        "error": None,
    }


def error_info(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc),
            "traceback": "".join(traceback.format_exception(exc))}
