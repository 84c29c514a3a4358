"""`--devices N` without XLA_FLAGS emulates N CPU devices and sizes XLA's intra-op pool so a device
computing while the others wait in a collective still gets every core (PJRT_NPROC); a pool size
or device count the user chose is kept. Each case starts a fresh interpreter: both are read when
JAX's CPU backend starts."""

import json
import os
import subprocess
import sys

PROBE = """
import json, os
from ringjax.parallel.mesh import ensure_host_devices
ensure_host_devices(3)
import jax
print(json.dumps({"devices": jax.device_count(), "pjrt_nproc": os.environ.get("PJRT_NPROC")}))
"""


def probe(**env) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "PJRT_NPROC")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_emulated_devices_get_one_pool_thread_each_beyond_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert probe() == {"devices": 3, "pjrt_nproc": str(cores + 3)}


def test_a_pool_size_the_user_set_is_kept():
    assert probe(PJRT_NPROC="5") == {"devices": 3, "pjrt_nproc": "5"}


def test_xla_flags_that_set_the_device_count_leave_the_pool_alone():
    assert probe(XLA_FLAGS="--xla_force_host_platform_device_count=2") == {"devices": 2, "pjrt_nproc": None}
