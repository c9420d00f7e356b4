"""The on-disk compile cache: a later process gets its graphs back when it compiles them in the same order, never
another graph's code in any order; a pipeline run through it gives the same images as one without it."""
import json
import os
import subprocess
import sys

import numpy as np

from pipelines.compile_cache import graph_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# graph mode compiles only code in a source file: the drivers are written to files
TWO_GRAPHS = """
import json, os, sys
import numpy as np
import mindspore as ms
from mindspore import nn
import pipelines.compile_cache as compile_cache
from pipelines.compile_cache import DiskCompiled

if os.environ.get("KILL_AFTER_SAVE"):  # the process dies after MindSpore saved a graph, before the manifest says so
    real_write, writes = compile_cache.write_json_atomic, []
    def dying_write(path, data):
        writes.append(path)
        if len(writes) == 2:
            os._exit(3)
        real_write(path, data)
    compile_cache.write_json_atomic = dying_write

class Scale(nn.Cell):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor  # a Python constant of the graph, as a policy's static settings are
        self.w = ms.Parameter(ms.Tensor(np.ones(3, np.float32)), name="w")
    def construct(self, x):
        return x * self.w * self.factor

root, order = sys.argv[1], [int(f) for f in sys.argv[2].split(",")]
cells, out = {}, {}
for factor in order:  # a factor given twice: the same cell wrapped again, which MindSpore does not compile again
    cell = cells.setdefault(factor, Scale(factor))
    out[factor] = DiskCompiled(cell.construct, root, cell, ("scale", factor))(ms.Tensor(np.ones(3, np.float32))).asnumpy().tolist()
print(json.dumps(out))
"""

PIPELINE = """
import sys
import numpy as np
from fbcache_ms.config import CacheConfig
from pipelines.flux_pipeline import FluxPipeline

checkpoint, root, out = sys.argv[1], sys.argv[2], sys.argv[3]
pipe = FluxPipeline.from_pretrained(checkpoint, mode="graph", compile_cache=root or None)
call = dict(prompt="a cat", height=64, width=64, num_inference_steps=4, seed=3, output_type="np", progress=False)
plain = pipe(**call).images
cached = pipe(**call, cache=CacheConfig("fbcache", threshold=0.5)).images
np.savez(out, plain=plain, cached=cached)
"""


def _run(tmp_path, source, *args, returncode=0, **env_vars):
    driver = tmp_path / "driver.py"
    driver.write_text(source)
    env = dict(os.environ, PYTHONPATH=ROOT, **env_vars)
    env.pop("MS_COMPILER_CACHE_ENABLE", None)
    done = subprocess.run([sys.executable, str(driver), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=900)
    assert done.returncode == returncode, done.stderr[-3000:]
    return done.stdout


def _saved(root):
    """MindSpore's compiled files: name -> modification time."""
    folder = graph_folder(str(root))
    return {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder) if f.endswith(".mindir")}


def test_a_graph_never_loads_another_graphs_code_whatever_the_order(tmp_path):
    root = tmp_path / "cache"
    expected = {"2": [2.0] * 3, "3": [3.0] * 3}
    assert json.loads(_run(tmp_path, TWO_GRAPHS, root, "2,3").splitlines()[-1]) == expected
    # the other order: MindSpore alone would load file 0, the doubling graph, for the tripling one
    assert json.loads(_run(tmp_path, TWO_GRAPHS, root, "3,2").splitlines()[-1]) == expected
    saved = _saved(root)
    # the same order again: both loaded, nothing compiled or written
    assert json.loads(_run(tmp_path, TWO_GRAPHS, root, "3,2").splitlines()[-1]) == expected
    assert _saved(root) == saved and len(saved) == 2


def test_a_run_killed_after_the_save_leaves_no_entry_for_the_new_file(tmp_path):
    root = tmp_path / "cache"
    assert json.loads(_run(tmp_path, TWO_GRAPHS, root, "2").splitlines()[-1]) == {"2": [2.0] * 3}
    # file 0 now holds the tripling graph, and the run dies before recording it
    _run(tmp_path, TWO_GRAPHS, root, "3", returncode=3, KILL_AFTER_SAVE="1")
    assert json.loads(_run(tmp_path, TWO_GRAPHS, root, "2").splitlines()[-1]) == {"2": [2.0] * 3}


def test_a_graph_compiled_once_for_two_wrappers_counts_once(tmp_path):
    # MindSpore numbers its files by the graphs it really compiles: a second wrapper of the same cell compiles
    # nothing, so the graph after it is still file 1, and a second run loads both
    root = tmp_path / "cache"
    expected = {"2": [2.0] * 3, "3": [3.0] * 3}
    assert json.loads(_run(tmp_path, TWO_GRAPHS, root, "2,2,3").splitlines()[-1]) == expected
    saved = _saved(root)
    assert json.loads(_run(tmp_path, TWO_GRAPHS, root, "2,2,3").splitlines()[-1]) == expected
    assert _saved(root) == saved and len(saved) == 2


def test_a_pipeline_run_loads_its_graphs_and_gives_the_same_images(tiny_dev_checkpoint, tmp_path):
    root = tmp_path / "cache"
    _run(tmp_path, PIPELINE, tiny_dev_checkpoint, "", tmp_path / "none.npz")
    _run(tmp_path, PIPELINE, tiny_dev_checkpoint, root, tmp_path / "first.npz")
    saved = _saved(root)
    _run(tmp_path, PIPELINE, tiny_dev_checkpoint, root, tmp_path / "again.npz")
    # clip, t5, the transformer, the vae and the FBCache policy: the second run loaded all five and wrote nothing
    assert len(saved) == 5
    assert _saved(root) == saved
    none, first, again = (np.load(tmp_path / f"{n}.npz") for n in ("none", "first", "again"))
    for key in ("plain", "cached"):
        np.testing.assert_array_equal(first[key], none[key])
        np.testing.assert_array_equal(again[key], none[key])


TWO_GRAPHS_IN_ONE_CALL = """
import json, os, sys
import numpy as np
import mindspore as ms
from mindspore import nn
from pipelines.compile_cache import DiskCompiled, graph_folder

class Scale(nn.Cell):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor
        self.w = ms.Parameter(ms.Tensor(np.ones(3, np.float32)), name="w")
    def construct(self, x):
        return x * self.w * self.factor

root = sys.argv[1]
x = ms.Tensor(np.ones(3, np.float32))
two, three, five = Scale(2), Scale(3), Scale(5)
first = DiskCompiled(two.construct, root, two, ("scale", 2))
both = (ms.jit(two.construct), ms.jit(three.construct))
first.fn = lambda x: both[1](both[0](x))  # one call that compiles two graphs: MindSpore's count is no longer ours
out = {"6": first(x).asnumpy().tolist()}
later = DiskCompiled(five.construct, root, five, ("scale", 5))
out["5"] = later(x).asnumpy().tolist()
folder = graph_folder(root)
out["files"] = sorted(f for f in os.listdir(folder) if f.startswith("compile_cache_"))
with open(os.path.join(folder, "manifest.json")) as f:
    out["manifest"] = json.load(f)
print(json.dumps(out))
"""


def test_a_call_that_compiles_two_graphs_caches_nothing_more(tmp_path):
    root = tmp_path / "cache"
    # an earlier run left files 0 and 1 (the doubling and tripling graphs) and their entries
    assert json.loads(_run(tmp_path, TWO_GRAPHS, root, "2,3").splitlines()[-1]) == {"2": [2.0] * 3, "3": [3.0] * 3}
    out = json.loads(_run(tmp_path, TWO_GRAPHS_IN_ONE_CALL, root).splitlines()[-1])
    # right results; files from 0 on are forgotten, and the rest of the process compiles without the cache
    assert out == {"6": [6.0] * 3, "5": [5.0] * 3, "files": [], "manifest": {}}
    # a later run compiles afresh and saves again
    assert json.loads(_run(tmp_path, TWO_GRAPHS, root, "3,2").splitlines()[-1]) == {"2": [2.0] * 3, "3": [3.0] * 3}
    assert len(_saved(root)) == 2
