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


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP model folder (no CLIP weights exist offline), with the real CLIP-L tokenizer files."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from eval.make_tiny_checkpoint import clip_tokenizer_dir

    import torch
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=77),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8),
                        projection_dim=16)
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).eval().save_pretrained(path)
    CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  CLIPTokenizer.from_pretrained(clip_tokenizer_dir())).save_pretrained(path)
    return str(path)
