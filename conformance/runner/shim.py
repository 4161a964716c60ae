"""One shim process (conformance/SHIM.md): commands on stdin, events on stdout, logs on stderr.
Every event and log line is kept with the time the runner read it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

LEVEL = re.compile(r"\b(trace|debug|info|warn|warning|error|critical|fatal)\b", re.IGNORECASE)
SEVERITY = {"trace": 0, "debug": 1, "info": 2, "warn": 3, "warning": 3, "error": 4,
            "critical": 4, "fatal": 4}


def line_level(text: str) -> str | None:
    """The level of a log line: its first level word (`INFO`, `WARNING:`, `[warn]`, ...)."""
    match = LEVEL.search(text)
    return match.group(1).lower() if match else None


@dataclass
class Record:
    at: float
    shim: str
    data: dict


@dataclass
class LogLine:
    at: float
    shim: str
    text: str
    level: str | None


@dataclass
class Journal:
    """Everything every shim of one case said, in arrival order."""

    events: list[Record] = field(default_factory=list)
    logs: list[LogLine] = field(default_factory=list)
    lock: threading.Condition = field(default_factory=threading.Condition)

    def add_event(self, record: Record) -> None:
        with self.lock:
            self.events.append(record)
            if record.data.get("event") == "log":
                level = str(record.data.get("level", "info")).lower()
                self.logs.append(LogLine(record.at, record.shim,
                                         str(record.data.get("message", "")), level))
            self.lock.notify_all()

    def add_log(self, line: LogLine) -> None:
        with self.lock:
            self.logs.append(line)

    def wait_for(self, predicate, timeout: float, start: int = 0):
        """The first event from index `start` on that satisfies `predicate`, or None."""
        deadline = time.monotonic() + timeout
        with self.lock:
            index = start
            while True:
                while index < len(self.events):
                    if predicate(self.events[index]):
                        return self.events[index]
                    index += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.lock.wait(left)

    def deliveries(self, message_id=...) -> list[Record]:
        return [e for e in self.events if e.data.get("event") == "delivery"
                and (message_id is ... or e.data.get("id") == message_id)]


class Shim:
    """A running shim. `name` is the case's name for it (a restarted shim keeps its name and
    its state directory)."""

    def __init__(self, name: str, command: list[str], env: dict, journal: Journal,
                 log_path: Path, cwd: Path):
        self.name = name
        self.closed = False
        self.journal = journal
        self.log_file = open(log_path, "a", encoding="utf-8")
        self.log_file.write(f"--- start {' '.join(command)}\n")
        self.started = len(journal.events)
        self.process = subprocess.Popen(
            command, cwd=cwd, env={**os.environ, **env}, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            at = time.monotonic()
            self.log_file.write(f"{at:.3f} out {line}")
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                data = {"event": "garbage", "line": line.rstrip("\n")}
            if not isinstance(data, dict):
                data = {"event": "garbage", "line": line.rstrip("\n")}
            self.journal.add_event(Record(at, self.name, data))
        self.journal.add_event(Record(time.monotonic(), self.name, {"event": "_exit"}))

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            at = time.monotonic()
            self.log_file.write(f"{at:.3f} err {line}")
            text = line.rstrip("\n")
            self.journal.add_log(LogLine(at, self.name, text, line_level(text)))

    def send(self, command: dict) -> None:
        try:
            self.process.stdin.write(json.dumps(command) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def wait_event(self, predicate, timeout: float):
        mine = lambda record: record.shim == self.name and predicate(record.data)
        return self.journal.wait_for(mine, timeout, self.started)

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self._close()

    def stop(self, timeout: float = 15) -> bool:
        """Graceful stop (`stop`, then `stopped` and exit 0); SIGKILL when it takes longer.
        True when the shim stopped by itself."""
        if not self.alive():
            self._close()
            return False
        self.send({"op": "stop"})
        try:
            self.process.wait(timeout=timeout)
            graceful = self.process.returncode == 0
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            graceful = False
        self._close()
        return graceful

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for reader in self.readers:
            reader.join(timeout=5)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        self.log_file.close()
