"""Tensor files of Hugging Face checkpoints, read and written one tensor at a time, without a framework.

    f = open_weights("Llama-2-7b-hf/model-00001-of-00002.safetensors")   # or a pytorch_model*.bin
    f.keys(); f.info("model.norm.weight")     # TensorInfo(dtype="BF16", shape=(4096,))
    x = f.read("model.norm.weight")           # numpy (bfloat16 through ml_dtypes), read on demand

    w = ShardedWriter("out/lm", [TensorInfo("a", "F32", (2, 3)), ...], max_shard_bytes=5 << 30)
    w.write("a", array_or_bytes)              # in the order given; shards and the index JSON are
    w.close()                                 # written as the tensors come (model-0000k-of-0000n)

Nothing holds more than one tensor: safetensors headers are parsed and each tensor read with a seek;
`torch.save` zip files (`pytorch_model.bin`) are unpickled lazily (vchat.torch_pickle's safe
unpickler: tensors and OrderedDict only) and each storage read from the zip when asked for.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import zipfile
from dataclasses import dataclass

import numpy as np

from vchat.torch_pickle import _Unpickler

# safetensors dtype name -> (numpy dtype or None for bfloat16, bytes per element)
ST_DTYPES = {"F64": (np.float64, 8), "F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (None, 2),
             "I64": (np.int64, 8), "I32": (np.int32, 4), "I16": (np.int16, 2), "I8": (np.int8, 1),
             "U8": (np.uint8, 1), "BOOL": (np.bool_, 1)}
_TORCH_TO_ST = {"FloatStorage": "F32", "DoubleStorage": "F64", "HalfStorage": "F16", "BFloat16Storage": "BF16",
                "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
                "ByteStorage": "U8", "BoolStorage": "BOOL"}
INDEX_SUFFIX = ".index.json"


class TensorFileError(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # a safetensors dtype name: "F32", "BF16", ...
    shape: tuple

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * ST_DTYPES[self.dtype][1]


def numpy_dtype(dtype: str):
    """The numpy dtype of a safetensors dtype name (bfloat16 through ml_dtypes, which JAX brings)."""
    if dtype == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if dtype not in ST_DTYPES:
        raise TensorFileError(f"unsupported tensor dtype {dtype!r}")
    return np.dtype(ST_DTYPES[dtype][0])


def dtype_name(dtype) -> str:
    """numpy dtype -> safetensors dtype name."""
    dt = np.dtype(dtype)
    if dt.name == "bfloat16":
        return "BF16"
    for name, (np_dt, _) in ST_DTYPES.items():
        if np_dt is not None and np.dtype(np_dt) == dt:
            return name
    raise TensorFileError(f"no safetensors dtype for {dt}")


# -- reading ---------------------------------------------------------------------------------------------
class SafetensorsFile:
    """One `.safetensors` file: the header parsed, each tensor read on demand."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
            raise TensorFileError(f"{path}: not a readable safetensors file ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.base = 8 + n
        self._entries = header

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, key: str) -> TensorInfo:
        e = self._entries[key]
        return TensorInfo(key, e["dtype"], tuple(e["shape"]))

    def read_bytes(self, key: str) -> np.ndarray:
        """The tensor's bytes, C order, as a writable uint8 array (a fresh buffer, not zero-filled: nothing of
        the file stays mapped)."""
        begin, end = self._entries[key]["data_offsets"]
        data = np.empty(end - begin, np.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.base + begin)
            got = f.readinto(data)
        if got != end - begin:
            raise TensorFileError(f"{self.path}: tensor {key!r} is cut short (file truncated?)")
        return data

    def read(self, key: str) -> np.ndarray:
        return as_array(self.read_bytes(key), self.info(key))


def as_array(data, info: TensorInfo) -> np.ndarray:
    """numpy view of a tensor's bytes."""
    return np.frombuffer(data, dtype=numpy_dtype(info.dtype)).reshape(info.shape)


@dataclass(frozen=True)
class _LazyStorage:
    key: str
    stype: str


@dataclass(frozen=True)
class _LazyTensor:
    storage: _LazyStorage
    offset: int
    shape: tuple
    stride: tuple


class _LazyUnpickler(_Unpickler):
    """vchat.torch_pickle's allow-list unpickler, with storages and tensors left unread."""

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return lambda storage, offset, size, stride, *_: _LazyTensor(storage, offset, tuple(size), tuple(stride))
        return super().find_class(module, name)

    def persistent_load(self, pid):
        _, stype, key, _location, _numel = pid
        return _LazyStorage(key, stype.name)


class TorchBinFile:
    """One `torch.save` zip file (`pytorch_model.bin`): keys from its pickle, each tensor read on demand."""

    def __init__(self, path: str):
        self.path = path
        try:
            with zipfile.ZipFile(path) as zf:
                pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
                self.prefix = pkl[: -len("/data.pkl")]
                with zf.open(pkl) as f:
                    self._entries = dict(_LazyUnpickler(f, zf, self.prefix).load())
        except (OSError, zipfile.BadZipFile, StopIteration) as e:
            raise TensorFileError(f"{path}: not a torch.save zip file ({e or 'no data.pkl'})") from None
        bad = [k for k, v in self._entries.items() if not isinstance(v, _LazyTensor)]
        if bad:
            raise TensorFileError(f"{path}: entries that are not tensors: {bad[:5]}")
        self.metadata = {}

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, key: str) -> TensorInfo:
        t = self._entries[key]
        return TensorInfo(key, _TORCH_TO_ST[t.storage.stype], t.shape)

    def read_bytes(self, key: str) -> np.ndarray:
        """The tensor's bytes in C order, as a writable uint8 array (its storage read from the zip, the
        view copied out)."""
        t = self._entries[key]
        info = self.info(key)
        item = ST_DTYPES[info.dtype][1]
        raw = np.dtype(f"u{item}") if item > 1 else np.dtype(np.uint8)  # same-size stand-in (bfloat16 too)
        with zipfile.ZipFile(self.path) as zf:
            storage = np.frombuffer(zf.read(f"{self.prefix}/data/{t.storage.key}"), dtype=raw)
        view = np.lib.stride_tricks.as_strided(storage[t.offset:], shape=t.shape,
                                               strides=tuple(s * item for s in t.stride))
        return np.array(view).view(np.uint8).reshape(-1)

    def read(self, key: str) -> np.ndarray:
        return as_array(self.read_bytes(key), self.info(key))


@functools.lru_cache(maxsize=16)
def open_weights(path: str) -> SafetensorsFile | TorchBinFile:
    """A weight file's reader (cached: readers keep no file open, only the parsed header or pickle)."""
    return SafetensorsFile(path) if path.endswith(".safetensors") else TorchBinFile(path)


# -- writing ---------------------------------------------------------------------------------------------
def _as_bytes(x) -> memoryview:
    if isinstance(x, np.ndarray):  # through uint8: a buffer cannot hold bfloat16
        return memoryview(np.ascontiguousarray(x).reshape(-1).view(np.uint8))
    return memoryview(x).cast("B")


class SafetensorsWriter:
    """A safetensors file written tensor by tensor: the header (from `infos`) first, then each tensor's
    bytes in the order of `infos`."""

    def __init__(self, path: str, infos: list[TensorInfo], metadata: dict | None = None):
        self.path, self.infos, self.next = path, list(infos), 0
        header, offset = {}, 0
        for info in self.infos:
            header[info.name] = {"dtype": info.dtype, "shape": list(info.shape),
                                 "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
        if metadata:
            header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-aligned, as safetensors writes it
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, data) -> None:
        info = self.infos[self.next]
        if name != info.name:
            raise TensorFileError(f"{self.path}: expected tensor {info.name!r} next, got {name!r}")
        buf = _as_bytes(data)
        if buf.nbytes != info.nbytes:
            raise TensorFileError(f"{self.path}: {name} has {buf.nbytes} bytes, expected {info.nbytes} "
                                  f"({info.dtype} {info.shape})")
        self.f.write(buf)
        self.next += 1

    def close(self) -> None:
        self.f.close()
        if self.next != len(self.infos):
            raise TensorFileError(f"{self.path}: {len(self.infos) - self.next} tensor(s) never written")


class ShardedWriter:
    """Safetensors shards of at most `max_shard_bytes` (a tensor never split) plus
    `{prefix}.safetensors.index.json`, as transformers writes them; one shard is `{prefix}.safetensors`."""

    def __init__(self, folder: str, infos: list[TensorInfo], max_shard_bytes: int = 5 << 30,
                 prefix: str = "model", metadata: dict | None = None):
        shards, size = [[]], 0
        for info in infos:
            if shards[-1] and size + info.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(info)
            size += info.nbytes
        n = len(shards)
        names = [f"{prefix}.safetensors"] if n == 1 else [
            f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.folder, self.metadata, self.shards, self.names = folder, metadata or {"format": "pt"}, shards, names
        self.order = [(i, info.name) for i, s in enumerate(shards) for info in s]
        self.pos, self.writer = 0, None
        if n > 1:
            index = {"metadata": {"total_size": sum(i.nbytes for i in infos)},
                     "weight_map": {info.name: names[i] for i, s in enumerate(shards) for info in s}}
            with open(os.path.join(folder, f"{prefix}.safetensors{INDEX_SUFFIX}"), "w") as f:
                json.dump(index, f, indent=2)

    def write(self, name: str, data) -> None:
        shard, _ = self.order[self.pos]
        if self.writer is None or self.writer.path != os.path.join(self.folder, self.names[shard]):
            if self.writer is not None:
                self.writer.close()
            self.writer = SafetensorsWriter(os.path.join(self.folder, self.names[shard]), self.shards[shard],
                                            self.metadata)
        self.writer.write(name, data)
        self.pos += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.pos != len(self.order):
            raise TensorFileError(f"{self.folder}: {len(self.order) - self.pos} tensor(s) never written")
