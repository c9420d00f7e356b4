"""Compiled graphs kept on disk between runs, safely, through MindSpore's compile cache.

What MindSpore 2.10 does (MS_COMPILER_CACHE_ENABLE / MS_COMPILER_CACHE_PATH; measured here): it saves the n-th
graph a process compiles with the cache enabled as compile_cache_<n>.mindir, and on a later run loads file n
for the n-th graph, checking only the hash of the Python source. Two different graphs compiled in the other
order by a later process get each other's compiled code (seen: a graph that doubles the model's output
returned the undoubled output of the graph compiled first the run before). The folder is read once per
process; the switch at every compile.

So here every cached compile goes through `DiskCompiled`, which counts them (n), keeps beside MindSpore's files
a manifest of which graph each file n holds (a hash of everything the graph is built from: what it is, its
cell's parameter names, shapes and dtypes, its configuration, its inputs' shapes and dtypes, this project's
source, the MindSpore version and the device), moves file n aside before the compile when it holds another
graph (back if MindSpore compiled nothing, having the graph in memory already), counts only the calls that
added a graph to MindSpore's compiled graphs, and turns the cache on for those calls only. A run that
compiles its graphs in the same order as an earlier one loads them all; another order compiles again; no
order loads a wrong graph. One folder per process; processes that share a folder take turns (a file lock
around each compile).
"""
import fcntl
import hashlib
import json
import os

import mindspore as ms
from mindspore.graph.api import ms_compile_cache

from utils import write_json_atomic

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SOURCES = ("models", "fbcache_ms", "pipelines", "utils.py")
_source_digest = None
# MindSpore's own count (cached compiles of this process); after a failed compile the count may no longer be
# MindSpore's, so the rest of the process compiles without the cache
_process = {"root": None, "compiles": 0, "failed": False}


def source_digest():
    """Hash of this project's graph-building source (a changed line is another graph)."""
    global _source_digest
    if _source_digest is None:
        h = hashlib.sha256()
        for entry in _SOURCES:
            path = os.path.join(_ROOT, entry)
            files = [path] if path.endswith(".py") else sorted(
                os.path.join(d, f) for d, _, names in os.walk(path) for f in names if f.endswith(".py"))
            for name in files:
                h.update(os.path.relpath(name, _ROOT).encode())
                with open(name, "rb") as f:
                    h.update(f.read())
        _source_digest = h.hexdigest()
    return _source_digest


def cell_signature(cell):
    """Parameter names, shapes and dtypes of a cell: its architecture and the sizes of its state."""
    return [(name, tuple(p.shape), str(p.dtype)) for name, p in cell.parameters_and_names()]


def _input_signature(args, kwargs):
    def one(a):
        return (tuple(a.shape), str(a.dtype)) if isinstance(a, ms.Tensor) else repr(a)
    return repr(([one(a) for a in args], sorted((k, one(v)) for k, v in kwargs.items())))


def graph_folder(root):
    """Where MindSpore keeps the compiled files of `root` for this rank."""
    return os.path.join(root, f"rank_{os.environ.get('RANK_ID', '0')}", "graph_cache")


ENV_CONFLICT = ("MindSpore's own compile cache is on (MS_COMPILER_CACHE_ENABLE=1 or set_context("
                "enable_compile_cache=True)): it caches graphs by compile order, unchecked; turn it off to use the "
                "compile cache folder")


def mindspores_own_cache_is_on():
    return os.environ.get("MS_COMPILER_CACHE_ENABLE") == "1" or bool(ms.get_context("enable_compile_cache"))


class DiskCompiled:
    """ms.jit(fn), each first call with new input shapes compiled through the compile cache in `root`.
    identity: anything printable that, with the cell's parameters and the inputs' shapes, determines the
    graph: its name and the configuration its construct reads as Python constants."""

    def __init__(self, fn, root, cell, identity):
        if mindspores_own_cache_is_on():  # graphs it caches outside ours would shift the count
            raise ValueError(ENV_CONFLICT)
        self.fn = ms.jit(fn)
        self.root = os.path.abspath(root)
        from models.layers import fast_paths  # cells read it when built: the fused kernels are other graphs
        import mindone
        import transformers
        # mindone and transformers: the text encoders' code, outside this project's source digest
        self.identity = repr((identity, cell_signature(cell), source_digest(), ms.__version__, mindone.__version__,
                              transformers.__version__, ms.get_context("device_target"), fast_paths()))
        self.compiled = set()

    def __call__(self, *args, **kwargs):
        signature = _input_signature(args, kwargs)
        if signature in self.compiled or _process["failed"]:
            return self.fn(*args, **kwargs)
        if _process["root"] not in (None, self.root):
            raise ValueError(f"one compile cache folder per process: {_process['root']} is in use, not {self.root}")
        _process["root"] = self.root
        key = hashlib.sha256(repr((self.identity, signature)).encode()).hexdigest()
        folder = graph_folder(self.root)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(self.root, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            n = _process["compiles"]
            manifest_path = os.path.join(folder, "manifest.json")
            manifest = {}
            if os.path.exists(manifest_path):
                with open(manifest_path, encoding="utf-8") as f:
                    manifest = json.load(f)
            saved = os.path.join(folder, f"compile_cache_{n}.mindir")
            aside = saved + ".aside"
            before = manifest.get(str(n))
            if before != key:
                # another graph's code (or none): MindSpore must not load it for this one, and until this call
                # has saved its own, the manifest must not vouch for file n (a run killed after MindSpore's save
                # would otherwise leave this graph's file under the other's entry)
                if os.path.exists(saved):
                    os.replace(saved, aside)
                if before is not None:
                    manifest.pop(str(n))
                    write_json_atomic(manifest_path, manifest)
            os.environ["MS_COMPILER_CACHE_ENABLE"] = "1"
            os.environ["MS_COMPILER_CACHE_PATH"] = self.root
            graphs = len(ms_compile_cache)
            try:
                out = self.fn(*args, **kwargs)  # compiles, or loads file n
            except BaseException:
                _process["failed"] = True
                raise
            finally:
                os.environ.pop("MS_COMPILER_CACHE_ENABLE", None)
            new_graphs = len(ms_compile_cache) - graphs
            if new_graphs == 1:
                _process["compiles"] += 1
                if os.path.exists(saved):
                    manifest[str(n)] = key
                if os.path.exists(aside):
                    os.remove(aside)
            elif new_graphs == 0:
                # MindSpore had this graph in memory (the same cell wrapped twice) and counted nothing: file n
                # still belongs to the graph it was saved for
                if os.path.exists(aside):
                    os.replace(aside, saved)
                if before is not None:
                    manifest[str(n)] = before
            else:
                # more than one graph in one call: MindSpore's count is no longer ours, and files n and after
                # may hold anything; forget them and cache nothing more in this process
                _process["failed"] = True
                for name in os.listdir(folder):
                    index = name[len("compile_cache_"):].split(".")[0]
                    if name.startswith("compile_cache_") and index.isdigit() and int(index) >= n:
                        os.remove(os.path.join(folder, name))
                manifest = {i: k for i, k in manifest.items() if int(i) < n}
            write_json_atomic(manifest_path, manifest)
        self.compiled.add(signature)
        return out
