"""``fedrecon serve`` as a child process: for tests, benchmarks and drills that must kill, restart and
measure a real coordinator (its pid is the serving Python process itself, not a wrapper)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


class CoordinatorProcess:
    """Starts ``python -m fedrecon.cli serve`` and waits until it listens (it writes its port to a file)."""

    def __init__(self, task_file: Path, store_url: str, workdir: Path, *, port: int = 0,
                 name: str = "coordinator", extra_args: Sequence[str] = (), timeout_s: float = 60.0) -> None:
        port_file = workdir / f"{name}.port"
        port_file.unlink(missing_ok=True)
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed when the process ends: stop/kill)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedrecon.cli", "serve", "--task", str(task_file), "--store", store_url,
             "--host", "127.0.0.1", "--port", str(port), "--port-file", str(port_file), *extra_args],
            stdout=self._log, stderr=subprocess.STDOUT)
        give_up = time.monotonic() + timeout_s
        while not port_file.exists():  # serve writes the file whole (rename), once listening
            if self.proc.poll() is not None or time.monotonic() > give_up:
                self.stop()
                raise RuntimeError(f"the coordinator did not start:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self.address = f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        """What the process printed so far (also after ``stop``/``kill``)."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (a graceful shutdown) and wait; SIGKILL if it does not end in time. The exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL, as a crash: nothing in the process gets to run."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()
        return self.proc.returncode
