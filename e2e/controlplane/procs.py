"""Processes the benchmark starts: started in their own session with a log file and a pid
file, stopped by process group, their resident memory read from /proc, and every one of
them stopped when the benchmark ends, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable


class Failure(Exception):
    """A step failed; the message says which and why."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Process:
    """One long-running program of the benchmark (etcd, kube-apiserver, a plugin, ...)."""

    def __init__(self, name: str, argv: list[str], run_dir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = run_dir / "logs" / f"{name}.log"
        self.pid_path = run_dir / "pids" / f"{name}.pid"
        self.env = env
        self.popen: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise Failure(f"{self.name} is not running")
        return self.popen.pid

    def start(self) -> "Process":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.pid_path.parent.mkdir(parents=True, exist_ok=True)
        env = None if self.env is None else {**os.environ, **self.env}
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=env,
            )
        # The pid file names the executable too, so a later run stops only what it started.
        self.pid_path.write_text(f"{self.popen.pid}\n{self.argv[0]}\n")
        _started.append(self)
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the process group, SIGKILL after `timeout` seconds."""
        if self.popen is None:
            return
        if self.alive():
            _signal_group(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop on SIGTERM; killing it")
                _signal_group(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self.pid_path.unlink(missing_ok=True)
        if self in _started:
            _started.remove(self)
        self.popen = None

    def memory_kib(self) -> dict[str, int]:
        """VmRSS (resident now), VmHWM (peak resident) and RssAnon (the part of VmRSS that
        is the process's own memory rather than pages of files such as its executable) of
        the process, in KiB."""
        wanted = ("VmRSS", "VmHWM", "RssAnon")
        fields = {}
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in wanted:
                    fields[key] = int(value.split()[0])
        except OSError as e:
            raise Failure(f"failed to read the memory of {self.name}: {e}") from e
        if len(fields) != len(wanted):
            raise Failure(f"/proc/{self.pid}/status of {self.name} lacks one of {', '.join(wanted)}")
        return fields

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process (all its threads) has used so far."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError as e:
            raise Failure(f"failed to read the CPU time of {self.name}: {e}") from e
        # Fields after "pid (comm) ": state is field 3; utime and stime are fields 14 and 15.
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def fail(self, message: str) -> Failure:
        return Failure(f"{message}; last lines of {self.log_path}:\n{self.log_tail()}")


_started: list[Process] = []


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def stop_all() -> None:
    """Stops every process this benchmark started, newest first."""
    for proc in reversed(list(_started)):
        proc.stop()


def stop_stale(run_dir: Path) -> None:
    """Stops processes that an interrupted earlier run left behind: those whose pid file is
    in run_dir/pids and that still run the executable the file names."""
    pid_dir = run_dir / "pids"
    if not pid_dir.is_dir():
        return
    for pid_file in pid_dir.glob("*.pid"):
        try:
            pid_text, exe = pid_file.read_text().splitlines()[:2]
            pid = int(pid_text)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            pid_file.unlink(missing_ok=True)
            continue
        if cmdline and cmdline[0].decode(errors="replace") == exe:
            log(f"stopping {pid_file.stem} (pid {pid}) left by an earlier run")
            _signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            if Path(f"/proc/{pid}").exists():
                _signal_group(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)


def wait_until(timeout: float, what: str, check: Callable[[], bool], proc: Process | None = None,
               interval: float = 0.1) -> float:
    """Calls `check` every `interval` seconds until it returns true and returns how long
    that took; fails after `timeout` seconds, or at once, with its log, if `proc` exits."""
    started = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - started
        except (OSError, Failure):
            pass
        if proc is not None and not proc.alive():
            raise proc.fail(f"{proc.name} exited while waiting for {what}")
        if time.monotonic() - started > timeout:
            if proc is not None:
                raise proc.fail(f"timed out after {timeout:.0f}s waiting for {what}")
            raise Failure(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def run(argv: list, what: str, env: dict[str, str] | None = None, timeout: float = 600,
        stdin: str | None = None) -> str:
    """Runs a command to completion and returns its standard output; a failure is a
    Failure with the command's standard error."""
    argv = [str(a) for a in argv]
    try:
        done = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=timeout,
            env=None if env is None else {**os.environ, **env},
        )
    except subprocess.TimeoutExpired as e:
        raise Failure(f"{what}: timed out after {timeout:.0f}s ({' '.join(argv)})") from e
    except OSError as e:
        raise Failure(f"{what}: failed to run {argv[0]}: {e}") from e
    if done.returncode != 0:
        raise Failure(f"{what} failed (exit {done.returncode}): {' '.join(argv)}\n{done.stderr.strip()}")
    return done.stdout
