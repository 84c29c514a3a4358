"""Benchmarks that print JSON. Ratios are measured side by side in one run, alternating, since
the machines this runs on are shared and their absolute speed drifts (a single-device reference
next to emulated devices runs in a process of its own: `ringjax.bench_alone`)."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ringjax.errors import RingjaxError
from ringjax.models import HeadConfig, load_model
from ringjax.models.precision import cast_frozen_kernels
from ringjax.peft import leaf_mask, preset, split
from ringjax.train.optim import OptimConfig, make_optimizer
from ringjax.train.step import init_state, make_train_step


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak_gflops(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """Matmul throughput of this device, the yardstick for MFU: float32, or bfloat16 inputs with
    float32 accumulation (how `--compute-dtype bfloat16` multiplies)."""
    a = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
    f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    return 2 * n**3 / median_seconds(lambda: f(a), repeats) / 1e9


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "input_ids": jnp.asarray(rng.integers(1000, min(20000, vocab), (batch, seq)), jnp.int32),
        "attention_mask": jnp.ones((batch, seq), jnp.int32),
        "token_type_ids": jnp.zeros((batch, seq), jnp.int32),
        "labels": jnp.asarray(rng.integers(0, 2, (batch,)), jnp.int32),
    }


def compiled_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis.get("flops", 0.0))


def peak_bytes(compiled) -> int:
    """Arguments + outputs + temporaries, less donated buffers counted twice (XLA memory analysis)."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def single_device_step(model_name: str, method: str, batch: int, seq: int, unroll: bool = False,
                       compute_dtype: str = "float32"):
    """(compiled step, state, frozen, batch) for one training step of `method`."""
    model = load_model(model_name, head=HeadConfig("classification", 2), peft=preset(method))
    params = model.tree()
    trainable, frozen = split(params, leaf_mask(params, model.peft_config))
    frozen = cast_frozen_kernels(frozen, compute_dtype, model.peft_config)
    optimizer = make_optimizer(OptimConfig(), 1000)
    state = init_state(optimizer, trainable)
    step = make_train_step(model.config, model.peft_config, model.head_config, optimizer, params, model.depth, unroll,
                           compute_dtype)
    data = random_batch(batch, seq, model.config.vocab_size)
    compiled = step.lower(state, frozen, data).compile()
    return compiled, state, frozen, data


def bench_step(model: str = "minilm", method: str = "houlsby", batch: int = 32, seq: int = 64, repeats: int = 5,
               compute_dtype: str = "float32") -> dict:
    compiled, state, frozen, data = single_device_step(model, method, batch, seq, compute_dtype=compute_dtype)
    holder = [state]

    def run():
        holder[0], metrics = compiled(holder[0], frozen, data)
        return metrics["loss"]

    seconds = median_seconds(run, repeats)
    flops = compiled_flops(single_device_step(model, method, batch, seq, unroll=True, compute_dtype=compute_dtype)[0])  # see run_blocks
    peak = matmul_peak_gflops()
    achieved = flops / seconds / 1e9
    result = {
        "model": model, "method": method, "compute_dtype": compute_dtype, "batch": batch, "seq": seq, "seconds_per_step": seconds,
        "tokens_per_second": batch * seq / seconds, "flops_per_step": flops, "gflops_per_second": achieved,
        "matmul_peak_gflops": peak, "mfu": achieved / peak, "peak_bytes": peak_bytes(compiled),
        "device": str(jax.devices()[0].device_kind),
    }
    if compute_dtype != "float32":  # MFU against the peak of the dtype the projections multiply in
        narrow_peak = matmul_peak_gflops(dtype=compute_dtype)
        result.update({f"matmul_peak_gflops_{compute_dtype}": narrow_peak, "mfu_vs_float32_peak": achieved / peak,
                       "mfu": achieved / narrow_peak})
    return result


def bench_pac_cli(options: dict) -> dict:
    """`ringjax bench pac`: PAC's per-epoch seconds and training-step peak bytes (XLA memory
    analysis) next to full fine-tuning and Houlsby adapters, all measured in this one run
    (`ringjax.methods.pac.bench_pac`) on `--task` (default the synthetic task).

    Keys: model, task, device, max_length, epochs, n_devices, batch_size, train_examples,
    dev_examples, memory_tokens; methods.{pac, full, houlsby}.{epoch_seconds, compile_seconds,
    total_seconds, dev, memory.peak_bytes, ...} (pac adds cache_bytes, cache_dtype,
    epoch1_forward and, over several devices, memory_data_parallel: the per-device step);
    ratios.{epoch2_over_epoch1, pac_over_full_peak_bytes, houlsby_over_pac_total_seconds}.
    The activation cache is built in a temporary folder, so epoch 1 always runs the backbone.
    """
    import tempfile

    from ringjax.data import encode, get_task, load_task_data
    from ringjax.methods import activation_cache as ac
    from ringjax.methods.pac import bench_pac
    from ringjax.models import load_tokenizer
    from ringjax.models.model import check_max_length
    from ringjax.parallel.mesh import make_stage_mesh

    n, batch, seq = options.get("devices") or 4, options["batch"], options["seq"]
    epochs = options.get("epochs") or 2
    if n < 1 or epochs < 1:
        raise RingjaxError(f"--devices and --epochs must be at least 1, got {n} and {epochs}")
    if batch % n:
        raise RingjaxError(f"--batch {batch} must be a multiple of --devices {n}")
    ac.dtype_name(options.get("cache_dtype") or "bfloat16")
    if n > 1:
        make_stage_mesh(n)  # too few visible devices: one line naming XLA_FLAGS
    task_name = options.get("task") or "synthetic"
    task = get_task(task_name)
    head = HeadConfig("regression" if task.is_regression else "classification", max(task.num_labels, 2))
    model = load_model(options["model"], head=head, peft=preset("parallel"))
    check_max_length(model.config, seq)
    tokenizer = load_tokenizer(model.directory)
    data = {split: encode(load_task_data(task_name, options.get("data_dir"), split, limit, 0), tokenizer, seq,
                          model.config.max_length)
            for split, limit in (("train", options.get("train_examples")), ("dev", options.get("dev_examples")))}
    params = model.tree()
    base = {k: params[k] for k in ("embed", "blocks", "final")}
    baselines = tuple(b for b in (options.get("baselines") or "full,houlsby").split(",") if b)
    with tempfile.TemporaryDirectory(prefix="ringjax-bench-pac-") as cache_dir:
        result = bench_pac(model.config, head, base, data["train"], data["dev"], n_devices=n, epochs=epochs,
                           batch_size=batch, cache_dir=cache_dir, dtype=options.get("cache_dtype") or "bfloat16",
                           baselines=baselines, baseline_epochs=options.get("baseline_epochs"))
    return {"model": options["model"], "task": task_name, "device": str(jax.devices()[0].device_kind),
            "max_length": seq, "epochs": epochs, **result}


# `ringjax bench WHAT`: name -> fn(options from the command line) -> JSON-able dict
BENCHMARKS = {
    "step": lambda o: bench_step(o["model"], o["method"], o["batch"], o["seq"], o["repeats"], o.get("compute_dtype", "float32")),
    "pac": bench_pac_cli,
    "ring": lambda o: _bench_ring_cli(o),
}


def _bench_ring_cli(options: dict) -> dict:
    from ringjax.parallel.bench import bench_ring_cli  # imported late: ringjax.parallel.bench imports this module

    return bench_ring_cli(options)


def run_bench(what: str, options: dict) -> dict:
    if what not in BENCHMARKS:
        raise RingjaxError(f"unknown benchmark {what!r}; choose one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[what](options)
