import mindspore as ms
import numpy as np
import pytest
import torch

ms.set_device("CPU")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _pynative_by_default():
    """Each test starts in PyNative; graph execution is asked for explicitly (ms.jit / mode="graph")."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield


# Tiny random-weight FLUX.1 checkpoints (diffusers layout), built once per test session in a few seconds.
# Same seed for both: their text encoders and VAE are identical; the transformers differ (guidance embedder).
TINY_SHARD_SIZE = "200KB"   # the dev transformer (~0.6 MB in fp32) is saved in several shards


@pytest.fixture(scope="session")
def tiny_dev_checkpoint(tmp_path_factory):
    """Path (str) of a tiny FLUX.1-dev checkpoint: guidance embeds, dynamic shifting, sharded transformer."""
    from eval.make_tiny_checkpoint import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny_flux_dev")
    make_tiny_checkpoint(path, variant="dev", seed=0, max_shard_size=TINY_SHARD_SIZE)
    return str(path)


@pytest.fixture(scope="session")
def tiny_schnell_checkpoint(tmp_path_factory):
    """Path (str) of a tiny FLUX.1-schnell checkpoint: no guidance embeds, shift 1, one-file transformer."""
    from eval.make_tiny_checkpoint import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny_flux_schnell")
    make_tiny_checkpoint(path, variant="schnell", seed=0)
    return str(path)


@pytest.fixture(scope="session")
def torch_dev_pipeline(tiny_dev_checkpoint):
    """diffusers' FluxPipeline on the tiny dev checkpoint: the numerical reference."""
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_dev_checkpoint, torch_dtype=torch.float32)


@pytest.fixture(scope="session")
def dev_pipeline(tiny_dev_checkpoint):
    """Our pipeline on the same checkpoint, graph mode (compiled graphs are reused across tests)."""
    from pipelines.flux_pipeline import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_dev_checkpoint, mode="graph")
