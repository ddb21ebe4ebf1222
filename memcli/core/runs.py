"""The run folder (`memcli train --out RUN`): its layout and the reading and writing of its files; and the one
atomic writer every output of memcli goes through (a file is whole or absent, never half-written).

    RUN/config.yaml      settings, resolved values, versions, command      (write_config / read_config)
    RUN/metrics.jsonl    one line per logged step                          (MetricsLog / trim_metrics)
    RUN/summary.json     the result                                        (write_summary / read_summary)
    RUN/adapter/         the adapter in PEFT format                        (save_adapter)
    RUN/adapter.gguf     the same adapter for llama.cpp                    (gguf_path)
    RUN/checkpoints/     step-<N>.pt                                       (write_checkpoint / checkpoints)
    RUN.lock             beside the folder: held by the one process using it (RunLock)

Training decides what goes into these files; this module alone writes, trims and removes them.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from memcli.core.errors import UserError

CONFIG, METRICS, SUMMARY, ADAPTER, GGUF, CHECKPOINTS = (
    "config.yaml", "metrics.jsonl", "summary.json", "adapter", "adapter.gguf", "checkpoints")


# --- atomic writes -------------------------------------------------------------------------------------------

def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], what: str = "--out",
                 example: str | None = None) -> Path:
    """write(tmp) into a temporary file beside `path`, then rename it into place. On any error the temporary file
    goes and `path` is untouched; an OSError on the output (not on an input `write` reads) becomes one UserError
    naming `what` and the path. A `path` that is a folder is refused, suggesting path/`example` when given. The
    file gets the usual permissions (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    if path.is_dir():
        such_as = f" such as {path / example}" if example else ""
        raise UserError(f"{what} {path} is a folder; give a file name{such_as}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temp(path)
    except OSError as e:
        raise UserError(f"{what} {path}: cannot write there ({e.strerror or e})") from None
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is not None and Path(e.filename) not in (tmp, path):
            raise  # an input that could not be read, not the output
        raise UserError(f"{what} {path}: cannot write it ({e.strerror or e})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _new_temp(path: Path) -> Path:
    """A new, empty, uniquely named file `.NAME.<random>.tmp` beside `path`, created with mode 0666 & ~umask."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def write_text(path: str | os.PathLike, text: str, what: str = "--out") -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what)


def json_safe(obj):
    """obj with every NaN or infinite float replaced by None and numpy scalars made Python ones, so that it is
    strict JSON."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj, what: str = "--out") -> Path:
    """Strict JSON (NaN and infinities are refused: callers turn them into null first)."""
    return write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n", what)


def atomic_dir(target: str | os.PathLike, build: Callable[[Path], None], replace: bool = True) -> Path:
    """build(tmp_dir) beside `target`, then move the folder into place: whole or absent. An older `target` is
    replaced, or, with replace=False (a cache that another process may be filling too), kept."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        if target.exists() and replace:
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, target)
            except OSError:
                if not target.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: keep its folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# --- the run folder ------------------------------------------------------------------------------------------

class RunLock:
    """The run folder `run` taken by this process, until `release` (or the process ends, however it ends).

    An exclusive fcntl.flock on RUN.lock beside the folder. Beside, not inside: it is taken before the folder
    exists (two `memcli train` started together must not both find it absent) and must outlive `--force` replacing
    the folder. flock rather than a file created with O_EXCL: the kernel drops a flock when its holder dies, by
    SIGKILL or a power cut too, so a lock file a killed process left blocks nothing and there is no guess about
    whether a recorded pid is still the holder (a pid is reused; on another host it cannot be checked). The file
    holds the holder's pid, host and start time only to name it when a second process is refused. `release`
    removes the file; a process that takes the lock checks that the file it locked is still the one at the path
    (the holder may have removed it in between), else takes it again. Parent folders made for the lock file are
    removed again on release when they are empty (bad input leaves nothing behind). On a network file system
    flock is as reliable as its locking (NFSv4: yes)."""

    def __init__(self, run: str | os.PathLike, what: str = "run folder"):
        self.run = Path(run)
        target = self.run.resolve()
        self.path = target.parent / f"{target.name or 'run'}.lock"
        self.made: list[Path] = []
        self.fd = None
        missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        try:
            for folder in reversed(missing):
                try:
                    folder.mkdir()
                    self.made.append(folder)
                except FileExistsError:
                    pass
            for _ in range(100):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise UserError(f"{what} {self.run} is in use by {self.holder()}; wait for it to end or "
                                    f"give another --out (lock {self.path})") from None
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)  # locked a file its holder removed on release: take the one now at the path
            else:
                raise OSError(f"{self.path} keeps changing")
            self.fd = fd
            started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode())
        except OSError as e:
            self.release()
            doing = "lock" if self.run.is_dir() else "create"
            raise UserError(f"--out {self.run}: cannot {doing} the run folder ({e.strerror or e})") from None
        except BaseException:
            self.release()
            raise

    def holder(self) -> str:
        """'process 123 (started ...)' from the lock file; it is written just after the lock is taken, so an
        empty file is read again for a moment."""
        for _ in range(20):
            try:
                info = json.loads(self.path.read_text(encoding="utf-8"))
                pid, host, started = info["pid"], info["host"], info["started"]
                where = "" if host == socket.gethostname() else f" on host {host}"
                return f"another memcli process (pid {pid}{where}, started {started})"
            except (OSError, ValueError, KeyError, TypeError):
                time.sleep(0.05)
        return "another memcli process"

    def release(self) -> None:
        """Remove the lock file and let go of the lock (removing first: a process waiting on this file then finds
        it gone and takes the new one). Idempotent."""
        if self.fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
        for folder in reversed(self.made):
            try:
                folder.rmdir()
            except OSError:
                break
        self.made = []

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def is_run(path: str | os.PathLike) -> bool:
    """A memcli run folder (started: config.yaml is written before the first step)."""
    return (Path(path) / CONFIG).is_file()


def has_adapter(run: str | os.PathLike) -> bool:
    return (Path(run) / ADAPTER / "adapter_config.json").is_file()


def adapter_dir(run: str | os.PathLike) -> Path:
    return Path(run) / ADAPTER


def gguf_path(run: str | os.PathLike) -> Path:
    return Path(run) / GGUF


def deployed_path(run: str | os.PathLike, quant: str) -> Path:
    """RUN/deploy/merged.<type>.gguf: the merged model `train --deploy` certified in llama.cpp."""
    return Path(run) / "deploy" / f"merged.{quant}.gguf"


def read_config(run: str | os.PathLike) -> dict:
    """RUN/config.yaml, or UserError naming it when it cannot be read or has no `settings` mapping."""
    import yaml

    path = Path(run) / CONFIG
    try:
        record = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"run config {path} is corrupt ({first})") from None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        raise UserError(f"run config {path} is corrupt (no 'settings' mapping)")
    return record


def read_settings(run: str | os.PathLike) -> dict:
    return read_config(run)["settings"]


def write_config(run: str | os.PathLike, record: dict) -> Path:
    import yaml

    return write_text(Path(run) / CONFIG, yaml.safe_dump(record, sort_keys=False), what="run config")


def read_summary(run_or_file: str | os.PathLike) -> dict | None:
    """RUN/summary.json (or a summary.json path); None when the run has not finished; UserError when corrupt."""
    path = Path(run_or_file)
    if path.is_dir():
        path = path / SUMMARY
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a run summary (not a JSON object)")
    return data


def write_summary(run: str | os.PathLike, summary: dict) -> Path:
    return write_json(Path(run) / SUMMARY, summary, what="run summary")


def save_adapter(run: str | os.PathLike, model) -> Path:
    """The PEFT adapter of `model` as RUN/adapter/, replaced whole."""
    return atomic_dir(adapter_dir(run), lambda tmp: model.save_pretrained(tmp))


def create_run(run: str | os.PathLike) -> Path:
    """The run folder and its checkpoints/ folder (nothing else is written yet)."""
    (Path(run) / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    return Path(run)


def remove_run(run: str | os.PathLike) -> None:
    """The whole run folder, gone (--force, or a run that failed before its first checkpoint)."""
    shutil.rmtree(run, ignore_errors=True)


# --- metrics.jsonl -----------------------------------------------------------------------------------------

class MetricsLog:
    """RUN/metrics.jsonl opened for appending, one JSON row per logged step. Rows reach the file at `flush` (each
    checkpoint) and `close`; a resumed run cuts the rows past its checkpoint (`trim_metrics`)."""

    def __init__(self, run: str | os.PathLike):
        self._file = open(Path(run) / METRICS, "a")

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _metrics_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line that is not a whole metrics row."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, TypeError, KeyError):
        return math.inf
    return step if isinstance(step, int) else math.inf


def trim_metrics(run: str | os.PathLike, step: int) -> None:
    """Drop the metrics rows past `step` (and a line cut short): they belong to an interrupted attempt."""
    path = Path(run) / METRICS
    if path.exists():
        kept = [ln for ln in path.read_text(errors="replace").splitlines() if _metrics_step(ln) <= step]
        write_text(path, "".join(ln + "\n" for ln in kept), what="metrics")


def remove_metrics(run: str | os.PathLike) -> None:
    (Path(run) / METRICS).unlink(missing_ok=True)


# --- checkpoints/ ------------------------------------------------------------------------------------------

def checkpoints(run: str | os.PathLike) -> list[Path]:
    """The run's checkpoints, oldest first."""
    return sorted((Path(run) / CHECKPOINTS).glob("step-*.pt"))


def checkpoint_step(path: str | os.PathLike) -> int:
    return int(Path(path).stem.split("-")[1])


def latest_checkpoint(run: str | os.PathLike) -> Path | None:
    found = checkpoints(run)
    return found[-1] if found else None


def write_checkpoint(run: str | os.PathLike, step: int, save: Callable[[Path], None], keep: int = 2) -> Path:
    """save(tmp) as checkpoints/step-<step>.pt, whole or absent; then only the `keep` newest are kept."""
    path = atomic_write(Path(run) / CHECKPOINTS / f"step-{step:08d}.pt", save, what="checkpoint")
    for old in checkpoints(run)[:-keep]:
        old.unlink()
    return path


def discard_checkpoints_from(run: str | os.PathLike, step: int) -> None:
    """Remove the checkpoints of `step` and later."""
    for path in checkpoints(run):
        if checkpoint_step(path) >= step:
            path.unlink()
