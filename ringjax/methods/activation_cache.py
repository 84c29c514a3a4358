"""PAC's activation cache: every example's backbone taps, padding dropped, keyed by what made them.

Layout of one cache entry (a directory `<cache_dir>/pac-<key>/`, or the same arrays in host RAM):

    taps.bin    one flat C-order array (total_real_tokens, K, H) in the cache dtype (float32,
                bfloat16 or float16); example i owns rows [offsets[i], offsets[i + 1])
    index.npz   offsets (n + 1,) int64 and lengths (n,) int64
    meta.json   the key and every field it was hashed from, dtype, shapes, byte counts
    COMPLETE    written last, holds the key: no marker, no cache

A build writes into a private temporary directory (`.pac-<key>.tmp-<pid>-<random>`),
flushes and fsyncs the data, writes the marker last and renames the directory into place
(atomic on POSIX). A directory without a marker, with a marker for another key, or with a
taps file of the wrong size is an interrupted or foreign build: it is deleted and rebuilt,
never read. A stale key (changed weights, config, tokenizer, data, maximum length, tap set or
dtype) names a different directory, so it is never looked up at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from ringjax.errors import RingjaxError

FORMAT = 1  # bump when the layout or the meaning of the taps changes
MARKER = "COMPLETE"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16", "half": "float16"}


def dtype_name(dtype) -> str:
    """Canonical cache dtype name for 'fp32' / 'bf16' / 'fp16' / numpy or jax dtypes."""
    if isinstance(dtype, str):
        name = ALIASES.get(dtype.lower(), dtype.lower())
    else:
        name = np.dtype(dtype).name
    if name not in DTYPES:
        raise RingjaxError(f"cache dtype {dtype!r} is not supported; choose float32, bfloat16 or float16")
    return name


# ----------------------------------------------------------------------------- identities


def _hash_arrays(arrays, h=None) -> str:
    h = h or hashlib.blake2b(digest_size=20)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a.reshape(-1).view(np.uint8)))
    return h.hexdigest()


def weights_identity(tree) -> str:
    """Content hash of a parameter tree (paths, dtypes, shapes and bytes): ~0.2 s per 100 MB."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    h = hashlib.blake2b(digest_size=20)
    for path, leaf in flat:
        h.update(jax.tree_util.keystr(path).encode())
        _hash_arrays([np.asarray(leaf)], h)
    return h.hexdigest()


def data_identity(input_ids, token_type_ids, offsets) -> str:
    """Hash of the token ids themselves (so also of the tokenizer's output and the truncation)."""
    return _hash_arrays([np.asarray(input_ids), np.asarray(token_type_ids), np.asarray(offsets)])


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                   "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def tokenizer_identity(tokenizer) -> str:
    """Hash of a tokenizer: its files when given a directory, else its class, vocabulary and special tokens."""
    h = hashlib.blake2b(digest_size=20)
    if isinstance(tokenizer, (str, os.PathLike)):
        directory = Path(tokenizer)
        found = False
        for name in TOKENIZER_FILES:
            path = directory / name
            if path.is_file():
                found = True
                h.update(name.encode())
                h.update(path.read_bytes())
        if not found:
            raise RingjaxError(f"no tokenizer files in {directory}; expected one of {TOKENIZER_FILES}")
        return h.hexdigest()
    h.update(type(tokenizer).__name__.encode())
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    special = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    h.update(json.dumps(special, sort_keys=True).encode())
    h.update(str(getattr(tokenizer, "do_lower_case", getattr(tokenizer, "init_kwargs", {}).get("do_lower_case"))).encode())
    return h.hexdigest()


def model_identity(directory) -> dict:
    """Where the weights came from: the resolved directory and (name, size, mtime) of its model files."""
    directory = Path(directory).resolve()
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
    return {"directory": str(directory), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def cache_key(**fields) -> tuple[str, dict]:
    """(key, material): a hash of every field (JSON-serialisable) plus the format version."""
    material = {"format": FORMAT, **fields}
    text = json.dumps(material, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32], json.loads(text)


# ----------------------------------------------------------------------------- the cache


class ActivationCache:
    """A complete cache: per-example tap slices from one flat array (memory-mapped or in RAM)."""

    def __init__(self, key: str, taps: np.ndarray, offsets: np.ndarray, path: Path | None = None, meta=None):
        self.key = key
        self.taps = taps  # (total_tokens, K, H)
        self.offsets = np.asarray(offsets, np.int64)
        self.lengths = np.diff(self.offsets)
        self.path = path
        self.meta = meta or {}

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def n_taps(self) -> int:
        return self.taps.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of tap data (what the cache costs in RAM or on disk, before the small index)."""
        return int(self.taps.size * self.taps.dtype.itemsize)

    @property
    def disk_bytes(self) -> int:
        """Bytes on disk of the whole entry (0 for an in-memory cache)."""
        if self.path is None:
            return 0
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    def example(self, i: int) -> np.ndarray:
        """(length_i, K, H): example i's taps, real tokens only."""
        return self.taps[self.offsets[i] : self.offsets[i + 1]]

    def gather(self, indices, width: int, out_dtype=None) -> tuple[np.ndarray, np.ndarray]:
        """(taps (B, width, K, H) zero-padded, lengths (B,)) for examples `indices`; longer examples are cut."""
        indices = np.asarray(indices, np.int64)
        lengths = np.minimum(self.lengths[indices], width)
        columns = np.arange(width)
        valid = columns[None, :] < lengths[:, None]
        rows = (self.offsets[indices][:, None] + columns[None, :])[valid]
        out = np.zeros((len(indices), width, *self.taps.shape[1:]), out_dtype or self.taps.dtype)
        out[valid] = self.taps[rows]
        return out, lengths

    # -- opening

    @classmethod
    def open(cls, cache_dir, key: str) -> ActivationCache | None:
        """The complete entry for `key`, or None. An incomplete or inconsistent entry is deleted."""
        final = entry_path(cache_dir, key)
        if not final.exists():
            return None
        reason = _check_entry(final, key)
        if reason is not None:
            shutil.rmtree(final, ignore_errors=True)
            return None
        meta = json.loads((final / "meta.json").read_text())
        index = np.load(final / "index.npz")
        taps = np.memmap(final / "taps.bin", DTYPES[meta["dtype"]], "r", shape=tuple(meta["shape"]))
        return cls(key, taps, index["offsets"], final, meta)


def entry_path(cache_dir, key: str) -> Path:
    return Path(cache_dir) / f"pac-{key}"


def _check_entry(final: Path, key: str) -> str | None:
    """Why `final` must not be read (None when it is a complete build of `key`)."""
    marker = final / MARKER
    if not marker.is_file():
        return "no completion marker (interrupted build)"
    if marker.read_text().strip() != key:
        return "marker for another key"
    try:
        meta = json.loads((final / "meta.json").read_text())
        index = np.load(final / "index.npz")
        offsets = index["offsets"]
    except (OSError, ValueError, KeyError):
        return "unreadable meta or index"
    if meta.get("key") != key or meta.get("format") != FORMAT:
        return "meta for another key or format"
    shape = tuple(meta["shape"])
    if offsets[-1] != shape[0]:
        return "index does not match the taps shape"
    expected = int(np.prod(shape)) * DTYPES[meta["dtype"]].itemsize
    if (final / "taps.bin").stat().st_size != expected:
        return "taps file has the wrong size"
    return None


class CacheBuilder:
    """Fills a cache example by example (any order); `finish()` publishes it atomically.

    cache_dir None builds in host RAM (nothing on disk, nothing to reuse across runs).
    """

    def __init__(self, cache_dir, key: str, material: dict, lengths, n_taps: int, hidden: int, dtype="bfloat16"):
        self.key = key
        self.material = material
        self.dtype_name = dtype_name(dtype)
        self.dtype = DTYPES[self.dtype_name]
        self.lengths = np.asarray(lengths, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.shape = (int(self.offsets[-1]), n_taps, hidden)
        self.written = np.zeros(len(self.lengths), bool)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        if self.cache_dir is None:
            self.tmp = None
            self.taps = np.zeros(self.shape, self.dtype)
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        _remove_dead_temporaries(self.cache_dir)
        self.tmp = self.cache_dir / f".pac-{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        if nbytes == 0:
            (self.tmp / "taps.bin").write_bytes(b"")
            self.taps = np.zeros(self.shape, self.dtype)
        else:
            self.taps = np.memmap(self.tmp / "taps.bin", self.dtype, "w+", shape=self.shape)

    def write(self, indices, taps, lengths=None) -> None:
        """Store rows of a padded batch: taps (B, T, K, H); rows with index < 0 are skipped."""
        indices = np.asarray(indices, np.int64)
        keep = indices >= 0
        indices = indices[keep]
        taps = np.asarray(taps)[keep]
        lengths = self.lengths[indices] if lengths is None else np.asarray(lengths)[keep]
        if np.any(lengths != self.lengths[indices]):
            raise RingjaxError("cache write: batch lengths differ from the data the cache was keyed on")
        width = taps.shape[1]
        if len(lengths) and lengths.max() > width:
            raise RingjaxError(f"cache write: an example of {lengths.max()} tokens does not fit a batch of width {width}")
        columns = np.arange(width)
        valid = columns[None, :] < lengths[:, None]
        rows = (self.offsets[indices][:, None] + columns[None, :])[valid]
        self.taps[rows] = taps[valid].astype(self.dtype, copy=False)
        self.written[indices] = True

    def missing(self) -> np.ndarray:
        return np.flatnonzero(~self.written)

    def finish(self) -> ActivationCache:
        missing = self.missing()
        if len(missing):
            raise RingjaxError(f"cache build incomplete: {len(missing)} examples were never written")
        meta = {
            "key": self.key, "format": FORMAT, "dtype": self.dtype_name, "shape": list(self.shape),
            "examples": len(self.lengths), "tap_bytes": int(np.prod(self.shape)) * self.dtype.itemsize,
            "material": self.material,
        }
        if self.tmp is None:
            return ActivationCache(self.key, self.taps, self.offsets, None, meta)
        if isinstance(self.taps, np.memmap):
            self.taps.flush()
        del self.taps
        np.savez(self.tmp / "index.npz", offsets=self.offsets, lengths=self.lengths)
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        for name in ("taps.bin", "index.npz", "meta.json"):
            _fsync(self.tmp / name)
        (self.tmp / MARKER).write_text(self.key)  # last: its presence certifies the rest
        _fsync(self.tmp / MARKER)
        _fsync(self.tmp)
        final = entry_path(self.cache_dir, self.key)
        if final.exists() and _check_entry(final, self.key) is not None:
            shutil.rmtree(final, ignore_errors=True)  # an interrupted build under the final name
        try:
            os.rename(self.tmp, final)
        except OSError:  # another process published the same key first: use theirs
            shutil.rmtree(self.tmp, ignore_errors=True)
        _fsync(self.cache_dir)
        self.tmp = None
        opened = ActivationCache.open(self.cache_dir, self.key)
        if opened is None:
            raise RingjaxError(f"cache {final} vanished or failed its check right after publishing")
        return opened

    def abort(self) -> None:
        if self.tmp is not None:
            self.taps = None
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_dead_temporaries(cache_dir: Path) -> None:
    """Delete temporary build folders whose process no longer runs (interrupted builds)."""
    for tmp in cache_dir.glob(".pac-*.tmp-*"):
        try:
            pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass


def list_entries(cache_dir) -> list[dict]:
    """Every entry under `cache_dir`: path, key, complete or not, bytes on disk."""
    out = []
    for path in sorted(Path(cache_dir).glob("pac-*")):
        key = path.name[4:]
        out.append({
            "path": str(path), "key": key, "complete": _check_entry(path, key) is None,
            "bytes": sum(p.stat().st_size for p in path.iterdir() if p.is_file()),
        })
    return out
