"""Reading `torch.save` files (the zip format: `pytorch_model.bin`) as numpy arrays, without torch.

    from vchat.torch_pickle import read_torch_bin
    sd = read_torch_bin("tests/golden/qwen-mmca/pytorch_model.bin")   # {key: np.ndarray}

Only tensors, storages and OrderedDict are unpickled; any other object in the file is refused.
"""

from __future__ import annotations

import collections
import pickle
import zipfile

import numpy as np

_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
           "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
           "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _StorageType:
    def __init__(self, name: str):
        self.name = name


def _rebuild_tensor(storage, offset, size, stride, *args):
    itemsize = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride)).copy()


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, zf: zipfile.ZipFile, prefix: str):
        super().__init__(f)
        self.zf, self.prefix = zf, prefix

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"unsupported object in checkpoint: {module}.{name}")

    def persistent_load(self, pid):
        _, stype, key, _location, _numel = pid
        dtype = _DTYPES[stype.name]
        if dtype == "bfloat16":
            import ml_dtypes

            dtype = ml_dtypes.bfloat16
        return np.frombuffer(self.zf.read(f"{self.prefix}/data/{key}"), dtype=dtype)


def read_torch_bin(path: str) -> dict[str, np.ndarray]:
    """A `torch.save`d state dict (zip format) as {key: numpy array}, without importing torch."""
    with zipfile.ZipFile(path) as zf:
        pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        prefix = pkl[: -len("/data.pkl")]
        with zf.open(pkl) as f:
            sd = _Unpickler(f, zf, prefix).load()
    return {k: np.asarray(v) for k, v in sd.items()}
