"""The run configuration: one typed dataclass, named presets, YAML files, command-line overrides.

Precedence: defaults < preset < YAML file < command-line flags. Every field is a flag
(`--max-length 64`), generated from the dataclass so the two never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from ringjax.errors import RingjaxError

DEFAULT_LR = {"full": 5e-5, "top-t": 1e-4, "lora": 5e-4, "houlsby": 1e-3, "pfeiffer": 1e-3, "parallel": 3e-3,
              "ringada": 1e-3, "pac": 3e-3, "deft": 1e-3, "caff": 1e-4, "fedavg-full": 1e-4, "fedlora": 5e-4,
              "uniform-t": 1e-4}


@dataclass
class TrainConfig:
    # what to train
    model: str = "minilm"
    task: str = "synthetic"
    data_dir: str | None = None
    method: str = "houlsby"
    adapter: str = "houlsby"  # the PEFT module RingAda / DEFT train
    top_t: int = 2
    train_norms: bool = False  # adapter / LoRA methods: the blocks' layer norms train too
    reduction_factor: int | None = None  # bottleneck adapters: hidden size / adapter width (None: the preset's 16)
    adapter_init_std: float | None = None  # bottleneck adapters: std of the down projection's init (None: the preset's 1e-2)
    lora_rank: int | None = None  # None: the preset's 8 (alpha scales with it: alpha = 2 x rank)
    lora_targets: str | None = None  # LoRA: comma list of projections, e.g. query,key,value,attn_out,ffn_in,ffn_out (None: query,value)
    side_every: int | None = None  # PAC / parallel: the side network reads every Nth block from the top (None: 2)
    compute_dtype: str = "float32"  # bfloat16: block projections multiplied in bf16 (adapter, LoRA, full, top-t)
    pooling: str = "cls"  # encoder heads: "cls" (Hugging Face's pooler on [CLS]) or "mean" over real tokens
    # how long
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    max_length: int = 64
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    # optimiser
    lr: float | None = None  # None: the method's default (DEFAULT_LR)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    seed: int = 0
    # output
    out: str = "runs/latest"
    eval_every: int = 0  # 0: evaluate once, at the end
    checkpoint_every: int = 0
    resume: bool = False
    progress: bool = True
    # ring pipeline (RingAda)
    devices: int = 1
    microbatches: int = 4
    unfreeze: str = "all"
    placement: str = "equal"  # equal | auto | sizes like 2,1,2,1
    schedule: str = "gpipe"
    fleet: str | None = None
    # PAC
    cache_dir: str | None = None
    cache_dtype: str = "float32"
    # DEFT / federated
    blocks: int | None = None
    clients: int = 100
    per_round: int = 10
    rounds: int = 20
    local_steps: int = 5
    alpha: float | None = 0.5  # Dirichlet label skew of the client split; 0: IID
    server_momentum: float = 0.0  # federated: FedAvgM's server momentum (0: plain averaging)
    server_lr: float = 1.0  # federated: the server's step along each round's averaged change (1: plain averaging)
    server_ema: float = 0.0  # federated: evaluate / keep a moving average of the server models with this decay (0: the latest)
    logit_adjust: float = 0.0  # federated classification: clients add this x log(their label prior) to the logits (0: plain loss)
    sampling: str = "eligible"  # federated: eligible (draw among the clients that afford the job) | all (the rest sit out)
    candidates: str | None = None  # CAFF: block counts of top-k model variants to choose among, e.g. 6,3

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.method, 1e-4)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    # The README's quick start: a short RingAda fine-tune of MiniLM on 4 emulated devices.
    "quickstart": dict(method="ringada", devices=4, microbatches=4, steps=60, batch_size=16, max_length=32,
                       unfreeze="0:2,20:4,40:6", eval_every=20, max_train_examples=2000, max_eval_examples=400,
                       out="runs/quickstart"),
    # Houlsby adapters' SST-2 recipe (88.3 / 87.4 / 88.3% dev accuracy at seeds 0 / 1 / 2 in 1,000
    # steps, ~215 s here): layer norms train too, bf16 frozen kernels, mean pooling (MiniLM's own),
    # and a down-projection init of std 0.1 rather than Houlsby's 1e-2, so the adapters start
    # moving the residual stream at once; add --data-dir GLUE
    "sst2-houlsby": dict(task="sst2", method="houlsby", steps=1000, batch_size=32, max_length=64, train_norms=True,
                         compute_dtype="bfloat16", pooling="mean", lr=3e-3, adapter_init_std=0.1, eval_every=250),
}


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for name, hint in hints.items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[name] = args[0] if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else hint
    return out


def _coerce(name: str, value):
    kind = _field_types()[name]
    if value is None or isinstance(value, kind):
        return value
    try:
        if kind is bool and isinstance(value, str):
            return value.lower() in ("1", "true", "yes", "on")
        return kind(value)
    except (TypeError, ValueError):
        raise RingjaxError(f"config field {name!r} expects {kind.__name__}, got {value!r}") from None


def build_config(preset: str | None = None, yaml_path: str | None = None, overrides: dict | None = None) -> TrainConfig:
    values: dict = {}
    if preset:
        if preset not in PRESETS:
            raise RingjaxError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        values.update(PRESETS[preset])
    if yaml_path:
        try:
            loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RingjaxError(f"cannot read config file {yaml_path}: {e}") from None
        if not isinstance(loaded, dict):
            raise RingjaxError(f"config file {yaml_path} must hold a mapping of field: value")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update(overrides or {})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RingjaxError(f"unknown config fields {unknown}; see `ringjax train --help`")
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field; unset flags stay absent so YAML and presets are not overridden."""
    parser.add_argument("--config", help="YAML file of config fields")
    parser.add_argument("--preset", help=f"named preset: {', '.join(sorted(PRESETS))}")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if _field_types()[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=f"(default: {f.default})")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return build_config(getattr(args, "preset", None), getattr(args, "config", None), overrides)
