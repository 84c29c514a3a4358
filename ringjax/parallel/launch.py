"""Start N local processes for one multi-process run (`ringjax launch --processes N -- CMD...`).

Each child runs the same command with the coordinator address, the process count and its
process id in its environment; `maybe_initialize_distributed()` (called by the train and bench
entries) joins them into one JAX runtime, so the program runs unchanged. Each child sees one
CPU device unless XLA_FLAGS in the launcher's environment say otherwise, so N processes make
an N-device ring. The first failing child stops the others.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from ringjax.errors import RingjaxError
from ringjax.parallel.mesh import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(process_id: int, num_processes: int, address: str, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env[ENV_COORDINATOR] = address
    env[ENV_NUM_PROCESSES] = str(num_processes)
    env[ENV_PROCESS_ID] = str(process_id)
    flags = env.get("RINGJAX_CHILD_XLA_FLAGS")
    if flags is not None:
        env["XLA_FLAGS"] = flags
    elif "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", ""):
        # one CPU device per process unless asked otherwise: N processes form an N-device ring
        env["XLA_FLAGS"] = " ".join(f for f in env["XLA_FLAGS"].split() if "xla_force_host_platform_device_count" not in f)
    return env


def launch(num_processes: int, argv: Sequence[str], timeout: float | None = None, env: dict | None = None,
           port: int | None = None) -> list[subprocess.CompletedProcess]:
    """Run `argv` in `num_processes` local processes; returns their results (stdout/stderr captured)."""
    procs = _start(num_processes, argv, env, port, capture=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    outs = [None] * len(procs)
    try:
        for i, p in enumerate(procs):
            left = None if deadline is None else max(deadline - time.monotonic(), 0.1)
            out, err = p.communicate(timeout=left)
            outs[i] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    except subprocess.TimeoutExpired:
        _stop(procs)
        raise RingjaxError(f"the {num_processes}-process run did not finish in {timeout:.0f} s") from None
    return outs


def main_launch(num_processes: int, command_argv: Sequence[str]) -> int:
    """CLI entry: run the command in N processes with inherited stdout/stderr; exit code of the run."""
    procs = _start(num_processes, command_argv, None, None, capture=False)
    code = 0
    try:
        while procs and any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.returncode not in (None, 0)]
            if failed:
                code = failed[0].returncode
                _stop(procs)
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(procs)
        return 130
    return code or next((p.returncode for p in procs if p.returncode), 0)


def _start(num_processes: int, argv: Sequence[str], env, port, capture: bool) -> list[subprocess.Popen]:
    if num_processes < 1:
        raise RingjaxError(f"--processes must be at least 1; got {num_processes}")
    if not argv:
        raise RingjaxError("nothing to launch: give the command after '--', e.g. ringjax launch --processes 2 -- ringjax train ...")
    address = f"127.0.0.1:{port or free_port()}"
    argv = list(argv)
    if argv[0] == "ringjax":  # the console script of this interpreter, even outside an activated venv
        entry = "import sys; from ringjax.cli.main import main; sys.argv[0] = 'ringjax'; sys.exit(main())"
        argv = [sys.executable, "-c", entry, *argv[1:]]
    pipe = subprocess.PIPE if capture else None
    return [
        subprocess.Popen(argv, env=child_env(i, num_processes, address, env), stdout=pipe, stderr=pipe, text=True)
        for i in range(num_processes)
    ]


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
