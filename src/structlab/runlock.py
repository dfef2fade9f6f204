"""One job per run directory: a lock file that global rank 0 holds while a run writes there.

`<run dir>/run.lock` records who holds the run (host, pid, the process's start time, start date and,
under SLURM, the job id). A second launch on a held run stops at once and names the holder. A lock
whose holder is gone (its pid no longer runs this process on this host, e.g. after `kill -9`) or that
an earlier run of the same SLURM job left (a requeue) is taken over with a log line; one held from
another host, which cannot be checked from here, only with `force=true`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)
LOCK_FILE = "run.lock"


class RunLockedError(RuntimeError):
    """Another job holds this run directory."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux /proc), which tells a live holder from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return start is None or _process_start(pid) in (None, start)


def this_process() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "process_start": _process_start(pid),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def _describe(holder: dict[str, Any]) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('started')}"


class RunLock:
    """Context manager: take `<run_dir>/run.lock` on entry, give it back on exit (normal end, error,
    SIGTERM or SIGINT). `kill -9` leaves the file behind; the next launch finds its holder gone."""

    def __init__(self, run_dir: str | Path, force: bool = False) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.force = force
        self.me = this_process()
        self._previous_sigterm: Any = None

    # --- taking and giving back ----------------------------------------------------------------------
    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: of two launches racing for a free run, exactly one creates the file
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._take_over(self._holder())
            return
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):  # a lock being written right now, or truncated by a crash
            return {}

    def _take_over(self, holder: dict[str, Any]) -> None:
        me, run = self.me, self.path.parent
        same_host = holder.get("host") == me["host"]
        if self.force:
            reason = "force=true"
        elif me["slurm_job_id"] and holder.get("slurm_job_id") == me["slurm_job_id"]:
            reason = f"a requeue of SLURM job {me['slurm_job_id']}"
        elif (
            same_host
            and isinstance(holder.get("pid"), int)
            and not _alive(holder["pid"], holder.get("process_start"))
        ):
            reason = f"its holder (pid {holder['pid']}) is gone"
        elif not holder:
            raise RunLockedError(
                f"run directory {run} is locked ({self.path} exists but cannot be read). If no job is "
                "training into it, delete the file or pass force=true; or choose another run_name=..."
            )
        elif same_host:
            raise RunLockedError(
                f"run directory {run} is in use by {_describe(holder)}. Wait for it to finish, stop it "
                f"(kill {holder['pid']}), or choose another run_name=..."
            )
        else:
            raise RunLockedError(
                f"run directory {run} is locked by {_describe(holder)}, another host, whose process "
                "cannot be checked from here. If that job is gone, pass force=true; otherwise choose "
                "another run_name=..."
            )
        tmp = self.path.with_name(f"{LOCK_FILE}.{me['host']}.{me['pid']}")
        tmp.write_text(json.dumps(me))
        os.replace(tmp, self.path)  # atomic: readers see the old holder or the new one
        if self._holder().get("pid") != me["pid"] or self._holder().get("host") != me["host"]:
            raise RunLockedError(f"run directory {run} was taken over by another launch at the same time")
        log.warning("took over the lock of %s from %s: %s", run, _describe(holder), reason)

    def release(self) -> None:
        holder = self._holder()
        if holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)

    # --- context manager: released however the run ends -------------------------------------------
    def __enter__(self) -> RunLock:
        self.acquire()
        if threading.current_thread() is threading.main_thread():
            # SIGTERM (scancel, kill) would end the process without unwinding: turn it into SystemExit,
            # so the lock is released on the way out. Lightning's own handler, installed during fit,
            # runs first and then calls this one.
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        self.release()

    @staticmethod
    def _on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)
