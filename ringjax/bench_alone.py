"""The single-device step timed in a process of its own, which sees one CPU device.

A process that emulates N host devices runs a plain single-device step slower than one that
does not (MiniLM, batch 32 x 64, on 2 cores: 0.95-1.02 s beside a 4-device ring's programs
against 0.80 s alone), so a reference timed beside the ring would flatter the ring. The bench
keeps this process waiting on a pipe and asks it for one timed step at a time, alternating with
its own measurements; while one side runs, the other is blocked on the pipe.

Protocol: the child prints "ready D P" (D: the devices it sees; P: its compiled step's peak bytes)
once its step is compiled and warmed up, then answers each
"step" line on stdin with "seconds S". Run as `python -m ringjax.bench_alone MODEL METHOD BATCH SEQ`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from ringjax.errors import RingjaxError

_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\d+")


class AloneStep:
    """A child process holding one compiled single-device training step of `method`."""

    def __init__(self, model: str, method: str, batch: int, seq: int):
        env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "PJRT_NPROC")}
        env["XLA_FLAGS"] = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
        self._proc = subprocess.Popen([sys.executable, "-m", "ringjax.bench_alone", model, method, str(batch), str(seq)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        devices, peak = self._expect("ready").split()
        self.devices, self.peak_bytes = int(devices), int(peak)

    def _expect(self, word: str) -> str:
        for line in self._proc.stdout:  # anything else a library prints to stdout is skipped
            if line.startswith(word):
                return line[len(word):].strip()
        self.close()
        raise RingjaxError("the single-device reference process stopped early (its error is printed above); "
                           "check that the model loads with `ringjax bench step`")

    def seconds(self) -> float:
        """Wall time of one more step in the child (excluding the pipe)."""
        self._proc.stdin.write("step\n")
        self._proc.stdin.flush()
        return float(self._expect("seconds"))

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=120)

    def __enter__(self) -> AloneStep:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(model: str, method: str, batch: int, seq: int) -> None:
    import jax

    from ringjax.bench import peak_bytes, single_device_step

    compiled, state, frozen, data = single_device_step(model, method, batch, seq)
    state, out = compiled(state, frozen, data)
    jax.block_until_ready(out)
    print(f"ready {jax.device_count()} {peak_bytes(compiled)}", flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        state, out = compiled(state, frozen, data)
        jax.block_until_ready(out)
        print(f"seconds {time.perf_counter() - start}", flush=True)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
