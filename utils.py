"""Small helpers shared by models, pipelines and eval scripts: device and dtype handling, timing, atomic writes."""
import json
import os
import time

import mindspore as ms

# The trained tiny FLUX.1 model committed with the project: the default model of the eval scripts.
EMBEDDED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trained-tiny-flux-shapes")

DTYPES = {"float32": ms.float32, "fp32": ms.float32, "float16": ms.float16, "fp16": ms.float16,
          "bfloat16": ms.bfloat16, "bf16": ms.bfloat16}


def device_target():
    return ms.get_context("device_target")


def on_ascend():
    return device_target() == "Ascend"


def resolve_dtype(dtype):
    """Accept a MindSpore dtype or its name; refuse what the current device cannot run."""
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}: choose one of float32, float16, bfloat16")
        dtype = DTYPES[dtype.lower()]
    if dtype not in (ms.float32, ms.float16, ms.bfloat16):
        raise ValueError(f"unsupported dtype {dtype}: choose one of float32, float16, bfloat16")
    if dtype == ms.bfloat16 and device_target() == "CPU":
        raise ValueError("bfloat16 is not supported on CPU (MindSpore has no CPU bf16 matmul kernel): "
                         "use float32 or float16 here, bfloat16 on Ascend")
    return dtype


class Timer:
    """`with Timer() as t: ...` then `t.seconds`."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def write_bytes_atomic(path, data):
    """Write to a temporary name, then rename: a killed run never leaves half a file (the pid keeps two writers of
    one path apart)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_text_atomic(path, text):
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path, data, indent=1):
    write_text_atomic(path, json.dumps(data, indent=indent))


def writable_parent(path):
    """The nearest existing folder at or above `path` if it is a writable folder (so `path` can be made), else None."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent if os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK) else None
