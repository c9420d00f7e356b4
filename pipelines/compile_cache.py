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


class DiskCompiled:
    """ms.jit(fn), each first call with new input shapes compiled through the compile cache in `root`.
    identity: anything printable that, with the cell's parameters and the inputs' shapes, determines the
    graph: its name and the configuration its construct reads as Python constants."""

    def __init__(self, fn, root, cell, identity):
        self.fn = ms.jit(fn)
        self.root = os.path.abspath(root)
        self.identity = repr((identity, cell_signature(cell), source_digest(), ms.__version__,
                              ms.get_context("device_target")))
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
        n = _process["compiles"]
        with open(os.path.join(self.root, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            manifest_path = os.path.join(folder, "manifest.json")
            manifest = {}
            if os.path.exists(manifest_path):
                with open(manifest_path, encoding="utf-8") as f:
                    manifest = json.load(f)
            saved = os.path.join(folder, f"compile_cache_{n}.mindir")
            aside = saved + ".aside"
            if manifest.get(str(n)) != key and os.path.exists(saved):
                os.replace(saved, aside)  # another graph's code: MindSpore must not load it for this one
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
            if new_graphs > 1:  # not one graph per call: the count can no longer be trusted
                _process["failed"] = True
            if new_graphs == 1:
                _process["compiles"] += 1
                if os.path.exists(saved):
                    manifest[str(n)] = key
                else:
                    manifest.pop(str(n), None)
                if os.path.exists(aside):
                    os.remove(aside)
            elif os.path.exists(aside):
                # no new graph: MindSpore had this one in memory (the same cell wrapped twice) and counted
                # nothing, so file n still belongs to the next graph it compiles
                os.replace(aside, saved)
            with open(manifest_path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=1)
            os.replace(manifest_path + ".tmp", manifest_path)
        self.compiled.add(signature)
        return out
