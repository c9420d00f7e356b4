"""Reading diffusers/transformers checkpoint folders (config.json + safetensors) into MindSpore cells.

Safetensors files are parsed here rather than through `safetensors.numpy`, because FLUX checkpoints
are stored in bfloat16, which numpy cannot represent: bf16 is widened to fp32 on read, then cast to
the cell's dtype. Tensors are memory-mapped and read one at a time, so a 24 GB checkpoint never has
to fit in memory twice.
"""
import json
import mmap
import os
import struct

import numpy as np
import mindspore as ms

_NP_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}

WEIGHT_INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
WEIGHT_FILE_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or does not fit the model."""


def read_config(folder):
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint folder {folder!r} does not exist")
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"no config.json in {folder!r}: is this a diffusers-format model folder?")
    return read_json(path)


def read_json(path, what="config"):
    """A JSON file's content; CheckpointError naming the file when it is missing, a folder or invalid."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, expected a {what} file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text: not a {what} file") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def safetensors_header(path):
    """The tensor table of a safetensors file, checked against the file's size (a truncated copy is named)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes: truncated?)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: not a safetensors file, or truncated (its header says {header_len} "
                                  f"bytes of header, the file has {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: damaged safetensors header (not JSON)") from None
    header.pop("__metadata__", None)
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(f"{path}: truncated: its tensors need {8 + header_len + end} bytes, the file has "
                              f"{size}")
    return header, 8 + header_len


class _SafetensorsFile:
    def __init__(self, path):
        self.path = path
        header, self._data_start = safetensors_header(path)
        with open(path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.entries = header

    def read(self, name):
        entry = self.entries[name]
        dtype = entry["dtype"]
        if dtype not in _NP_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
        begin, end = entry["data_offsets"]
        array = np.frombuffer(self._mmap, dtype=_NP_DTYPES[dtype], count=(end - begin) // np.dtype(_NP_DTYPES[dtype]).itemsize,
                              offset=self._data_start + begin).reshape(entry["shape"])
        if dtype == "BF16":  # bf16 is the top half of an fp32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array


class StateDict:
    """Lazy name -> numpy array view of every safetensors file of one model folder."""

    def __init__(self, folder):
        if not os.path.isdir(folder):
            raise CheckpointError(f"checkpoint folder {folder!r} does not exist")
        files = self.weight_files(folder)
        self._where = {}
        for path in files:
            st = _SafetensorsFile(path)
            for name in st.entries:
                self._where[name] = st

    @staticmethod
    def weight_files(folder):
        for index_name in WEIGHT_INDEX_NAMES:
            index_path = os.path.join(folder, index_name)
            if os.path.isfile(index_path):
                shards = sorted(set(read_json(index_path, "weight index")["weight_map"].values()))
                missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
                if missing:
                    raise CheckpointError(f"{index_path} names shards that are not there: {missing}")
                return [os.path.join(folder, s) for s in shards]
        for name in WEIGHT_FILE_NAMES:
            if os.path.isfile(os.path.join(folder, name)):
                return [os.path.join(folder, name)]
        found = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
        if found:
            return [os.path.join(folder, n) for n in found]
        raise CheckpointError(f"no .safetensors weights in {folder!r} (only safetensors checkpoints are supported)")

    def keys(self):
        return self._where.keys()

    def __contains__(self, name):
        return name in self._where

    def __getitem__(self, name):
        return self._where[name].read(name)


def load_weights(cell, state_dict, dtype, rename=None, ignore_unexpected=()):
    """Copy `state_dict` into `cell`'s parameters (names as in diffusers/transformers), cast to `dtype`.

    `rename` maps a cell parameter name to its checkpoint name where they differ (e.g. tied weights).
    Missing tensors, shape mismatches and unexpected tensors (unless a prefix in `ignore_unexpected`)
    raise CheckpointError naming them.
    """
    rename = rename or {}
    used, missing, mismatched = set(), [], []
    for name, param in cell.parameters_and_names():
        key = rename.get(name, name)
        if key not in state_dict:
            missing.append(key)  # the checkpoint's name: that is what a user looks for in the files
            continue
        array = state_dict[key]
        if tuple(array.shape) != tuple(param.shape):
            mismatched.append(f"{name}: checkpoint {tuple(array.shape)} vs model {tuple(param.shape)}")
            continue
        if param.dtype in (ms.float16, ms.float32, ms.bfloat16, ms.float64):
            # set_data casts to the parameter's current dtype, so the parameter itself must change first
            param.set_dtype(dtype)
        param.set_data(ms.Tensor(np.ascontiguousarray(array), param.dtype))
        used.add(key)
    unexpected = [k for k in state_dict.keys() if k not in used and not k.startswith(tuple(ignore_unexpected))]
    problems = []
    if missing:
        problems.append(f"missing from checkpoint: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if mismatched:
        problems.append(f"shape mismatch: {mismatched[:10]}")
    if unexpected:
        problems.append(f"not used by the model: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if problems:
        raise CheckpointError(f"{type(cell).__name__}: " + "; ".join(problems))
