"""The bench's single-device reference runs in a child process that sees one device, whatever
the parent emulates, and a child that cannot start says so in one line."""

import pytest

from ringjax.bench_alone import AloneStep
from ringjax.errors import RingjaxError


def test_reference_process_sees_one_device_beside_an_emulated_ring(monkeypatch, tiny_bert_dir):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "4")
    with AloneStep(str(tiny_bert_dir), "houlsby", 4, 8) as alone:
        assert alone.devices == 1 and alone.peak_bytes > 0
        assert all(alone.seconds() > 0 for _ in range(2))


def test_reference_process_that_cannot_load_the_model_is_one_error(tmp_path):
    with pytest.raises(RingjaxError, match="stopped early") as err:
        AloneStep(str(tmp_path / "no-such-model"), "houlsby", 4, 8)
    assert len(str(err.value).splitlines()) == 1
