"""Processes of the control plane, known by name in a run directory: started in their own
session with logs/NAME.log and pids/NAME.pid, stopped by process group, found again from the
pid file by a later invocation (`make down`, the next benchmark run), their resident memory
and CPU time read from /proc; and waiting for a condition, failing at once if the process
being waited for exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable


class Failure(Exception):
    """A step failed; the message says which and why."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Process:
    """One long-running program (etcd, kube-apiserver, a plugin, ...): the one this
    invocation started, or the one its pid file records."""

    def __init__(self, name: str, run_dir: Path):
        self.name = name
        self.log_path = run_dir / "logs" / f"{name}.log"
        self.pid_path = run_dir / "pids" / f"{name}.pid"
        self.popen: subprocess.Popen | None = None
        self.started: float | None = None  # time.monotonic() just before the start

    def start(self, argv: list, env: dict[str, str] | None = None, runs: str | None = None) -> "Process":
        """Starts argv; `runs` names the executable the process becomes when argv[0] execs
        another (nsenter), for the pid file."""
        argv = [str(a) for a in argv]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.pid_path.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=None if env is None else {**os.environ, **env},
            )
        # The pid file names the executable too, so that a later invocation stops only
        # what was started here, not whatever got the pid since.
        self.pid_path.write_text(f"{self.popen.pid}\n{runs or argv[0]}\n")
        _started.append(self)
        return self

    def _recorded_pid(self) -> int | None:
        """The pid the pid file records, if that process still runs the executable the
        file names (a file of one line, as older versions wrote, names none)."""
        try:
            lines = self.pid_path.read_text().splitlines()
            pid = int(lines[0])
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, ValueError, IndexError):
            return None
        if not argv0 or (len(lines) > 1 and argv0 != lines[1]):
            return None  # a zombie has no command line; another program has the pid
        return pid

    @property
    def pid(self) -> int:
        pid = self.popen.pid if self.popen is not None else self._recorded_pid()
        if pid is None:
            raise Failure(f"{self.name} is not running")
        return pid

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return self._recorded_pid() is not None

    def _exited(self, timeout: float) -> bool:
        if self.popen is not None:
            try:
                self.popen.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the process group, SIGKILL after `timeout` seconds; then the pid
        file goes."""
        if self.alive():
            pid = self.pid
            _signal_group(pid, signal.SIGTERM)
            if not self._exited(timeout):
                log(f"{self.name} did not stop on SIGTERM; killing it")
                _signal_group(pid, signal.SIGKILL)
                self._exited(timeout)
        self._forget()

    def kill(self, timeout: float = 20.0) -> None:
        """SIGKILL to the process group at once, as a crash or an OOM kill would end it
        (no SIGTERM first, so nothing is flushed or closed); waits until it is gone, and
        the pid file goes."""
        if self.alive():
            pid = self.pid
            _signal_group(pid, signal.SIGKILL)
            if not self._exited(timeout):
                raise self.fail(f"{self.name} (pid {pid}) still runs {timeout:.0f}s after SIGKILL")
        self._forget()

    def _forget(self) -> None:
        """After the process ended: its pid file goes, and this invocation no longer
        counts it as started."""
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

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def fail(self, message: str) -> Failure:
        return Failure(f"{message}; last lines of {self.log_path}:\n{self.log_tail()}")


_started: list[Process] = []


def process(name: str, run_dir: Path) -> Process:
    """The process `name` of run_dir: the one this invocation started, if it did (so that
    stopping or killing it also reaps it, leaving no zombie), else the one its pid file
    records."""
    for proc in _started:
        if proc.name == name and proc.pid_path == run_dir / "pids" / f"{name}.pid":
            return proc
    return Process(name, run_dir)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def stop_all() -> None:
    """Stops every process this invocation started, newest first."""
    for proc in reversed(list(_started)):
        proc.stop()


def stop_named(run_dir: Path, names: Iterable[str]) -> None:
    """Stops the processes of run_dir with these names, in this order, saying which run."""
    for name in names:
        proc = process(name, run_dir)
        if proc.alive():
            log(f"stopping {name}")
        proc.stop()


def stop_recorded(run_dir: Path, first: Iterable[str] = ()) -> None:
    """Stops every process recorded in run_dir/pids: those named in `first`, in that
    order, then the others, newest first."""
    first = list(first)
    files = sorted((run_dir / "pids").glob("*.pid"), key=lambda f: f.stat().st_mtime, reverse=True)
    stop_named(run_dir, first + [f.stem for f in files if f.stem not in first])


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


def up_or_down(command: str, names: list[str], run_dir: Path, down_all: Callable[[], None], make) -> int:
    """`up`, `down` or `kill` of a control plane, all of it or the named components (`kill`:
    the named ones, with SIGKILL, as a crash would end them): `make()` gives
    the object whose up() starts all and whose components() maps names to starters. A
    Failure is logged, and the exit status is 1."""
    try:
        if command == "kill":
            for name in names:
                log(f"killing {name} (SIGKILL)")
                process(name, run_dir).kill()
            return 0
        if command == "down":
            if names:
                stop_named(run_dir, names)
            else:
                down_all()
            return 0
        plane = make()
        if not names:
            plane.up()
            return 0
        known = plane.components()
        for name in names:
            if name not in known:
                raise Failure(f"unknown component {name} ({', '.join(known)})")
            known[name]()
        return 0
    except Failure as e:
        log(f"error: {e}")
        return 1
