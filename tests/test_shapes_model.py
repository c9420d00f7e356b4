"""The embedded trained model: its data, the adherence reader, the training script and the committed folder."""
import json
import os
from argparse import Namespace

import numpy as np
import pytest
import torch

from eval import adherence
from eval.shapes_data import (COLOURS, SHAPES, Scene, heldout_prompts, heldout_triples, is_heldout, render,
                              training_batch, training_sample)
from parity import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "trained-tiny-flux-shapes")


# ---------------------------------------------------------------- data

def test_training_stream_is_deterministic_and_never_draws_a_heldout_triple():
    assert training_sample(123) == training_sample(123)
    assert training_sample(123) != training_sample(124)
    images, captions = training_batch(40, 8)
    again, _ = training_batch(40, 8)
    assert np.array_equal(images, again) and images.shape == (8, 64, 64, 3) and images.dtype == np.uint8
    scenes = [training_sample(i) for i in range(3000)]
    assert not any(is_heldout(o.colour, o.shape, o.row, o.col) for s in scenes for o in s.objects)
    # the stream covers every shape and colour, and mixes one- and two-object scenes
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)
    assert {o.colour for s in scenes for o in s.objects} == set(COLOURS)
    assert 0.2 < np.mean([len(s.objects) == 2 for s in scenes]) < 0.4


def test_shape_weights_oversample_a_shape_and_leave_the_default_stream_alone():
    assert all(training_sample(i) == training_sample(i, shape_weights=None) for i in range(50))
    scenes = [training_sample(i, shape_weights={"star": 3.0}) for i in range(3000)]
    shapes = [o.shape for s in scenes for o in s.objects]
    assert abs(shapes.count("star") / len(shapes) - 3 / 8) < 0.03  # uniform: 1/6
    assert not any(is_heldout(o.colour, o.shape, o.row, o.col) for s in scenes for o in s.objects)


def test_heldout_set_asks_for_unseen_triples():
    scenes = heldout_prompts()
    assert len(scenes) == 700 and len(heldout_triples()) > 20
    assert all(is_heldout(s.objects[0].colour, s.objects[0].shape, s.objects[0].row, s.objects[0].col)
               for s in scenes)
    assert heldout_prompts(n_one=10, n_two=5) == scenes[:10] + scenes[500:505]  # a smaller set is a prefix
    assert len({s.caption for s in scenes}) > 600  # varied wording, not one template


# ---------------------------------------------------------------- adherence reader

def test_reader_is_exact_on_generator_images():
    scenes = heldout_prompts(n_one=300, n_two=100) + [training_sample(i) for i in range(300)]
    summary = adherence.summarize(scenes, [render(s) for s in scenes])
    for group in ("one object", "two objects"):
        for attr, value in summary[group].items():
            if attr != "n":
                assert value == 1.0, (group, attr, value)


@pytest.mark.parametrize("sigma", [1.0, 1.5])
def test_reader_reads_softened_generator_images(sigma):
    """A decoder rounds small shapes: the generator's images blurred by 1 or 1.5 px still read right (the first
    reader, whose blurred template was fitted by the sharp outline, read a 1 px-blurred star right 48% of the
    time)."""
    scenes = heldout_prompts(n_one=150, n_two=40)
    scenes = scenes + [s for s in heldout_prompts(n_one=500, n_two=0)[150:] if s.objects[0].shape == "star"]
    summary = adherence.summarize(scenes, [adherence.blurred(render(s), sigma) for s in scenes])
    for group in ("one object", "two objects"):
        for attr, value in summary[group].items():
            if attr != "n":
                assert value >= 0.99, (group, attr, value)


def test_reader_blames_what_is_wrong():
    scene = heldout_prompts(n_one=1, n_two=0)[0]
    obj = scene.objects[0]
    image = render(scene)
    other_colour = next(c for c in COLOURS if c != obj.colour)
    other_shape = next(s for s in SHAPES if s != obj.shape)
    wrong = Scene((obj.__class__(other_shape, other_colour, 2 - obj.row if obj.row != 1 else 0, obj.col,
                                 "large" if obj.size == "small" else "small"),), scene.background,
                  mentions_background=False)
    result = adherence.score(wrong, image)
    assert result == {"colour": False, "shape": False, "position": False, "size": False, "all": False}
    blank = np.full((64, 64, 3), 245, np.uint8)
    assert adherence.score(scene, blank)["all"] is False


def test_reader_refuses_other_sizes():
    with pytest.raises(ValueError, match="64x64"):
        adherence.read_image(np.zeros((32, 32, 3), np.uint8))


# ---------------------------------------------------------------- training script

def _train_args(out, **kw):
    from eval.train_shapes_model import build_parser
    return build_parser().parse_args([str(out), "--tiny", "--vae-steps", "40", "--vae-batch", "8", "--steps", "60",
                                      "--batch", "8", "--lr", "3e-3",
                                      *sum(([f"--{k}", str(v)] for k, v in kw.items()), [])])


def test_a_few_training_steps_lower_both_losses(tmp_path):
    from eval.train_shapes_model import train

    record = train(_train_args(tmp_path / "model"))
    vae = [h["l1"] for h in record["vae_history"]]
    flow = [h["loss"] for h in record["transformer_history"]]
    assert np.mean(vae[-8:]) < 0.8 * np.mean(vae[:8])
    assert np.mean(flow[-8:]) < 0.9 * np.mean(flow[:8])
    folder = tmp_path / "model"
    assert sorted(os.listdir(folder)) == sorted(["model_index.json", "scheduler", "text_encoder", "text_encoder_2",
                                                 "tokenizer", "tokenizer_2", "transformer", "vae",
                                                 "training_log.json", "training_loss.png"])
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    assert vae_cfg["latent_channels"] == 16 and vae_cfg["shift_factor"] == pytest.approx(record["latent_shift_factor"])
    assert not any(name.startswith(".training-") for name in os.listdir(tmp_path))  # the work folder is gone


def test_a_continued_run_keeps_the_encoder_and_extends_the_logs(tmp_path):
    from safetensors.numpy import load_file
    from eval.train_shapes_model import train

    first = train(_train_args(tmp_path / "a", **{"vae-steps": 10, "steps": 6}))
    record = train(_train_args(tmp_path / "b", **{"init-from": tmp_path / "a", "vae-steps": 10, "steps": 6}))
    assert len(record["phases"]) == 2 and record["phases"][1]["init_from"] == str(tmp_path / "a")
    assert [h["step"] for h in record["vae_history"]] == list(range(20))
    assert [h["step"] for h in record["transformer_history"]] == list(range(12))
    assert record["latent_shift_factor"] == first["latent_shift_factor"]
    old, new = (load_file(str(tmp_path / d / "vae" / "diffusion_pytorch_model.safetensors")) for d in "ab")
    for name in old:
        same = np.array_equal(old[name], new[name])
        assert same != name.startswith("decoder."), name  # only the decoder trained
    old, new = (load_file(str(tmp_path / d / "transformer" / "diffusion_pytorch_model.safetensors")) for d in "ab")
    assert any(not np.array_equal(old[k], new[k]) for k in old)


def test_flow_weights_mark_latent_pixels_that_touch_an_object():
    import torch
    from eval.shapes_data import training_batch
    from eval.train_shapes_model import OBJECT_WEIGHT, _images_to_tensor, flow_weights

    images, _ = training_batch(0, 2)
    w = flow_weights(torch, _images_to_tensor(torch, images), 16)  # [2, 64 tokens, 64]
    assert w.shape == (2, 64, 64)
    assert set(np.unique(w.numpy())) == {1.0, 1.0 + OBJECT_WEIGHT}
    objects = (np.ptp(images.astype(int), axis=-1) > 0.6 * 127.5).reshape(2, 16, 4, 16, 4).any(axis=(2, 4))
    tokens = objects.reshape(2, 8, 2, 8, 2).transpose(0, 1, 3, 2, 4).reshape(2, 64, 4)
    assert np.array_equal(w.numpy().reshape(2, 64, 16, 4)[:, :, 0, :] > 1, tokens)


def test_training_arguments_are_checked(tmp_path):
    from eval.train_shapes_model import main

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main([str(tmp_path / "full"), "--tiny"]) == 2  # not empty, no --force
    assert main([str(tmp_path / "new"), "--steps", "0"]) == 2
    assert main([str(tmp_path / "new"), "--lr", "nan"]) == 2
    assert main([str(tmp_path / "new"), "--vae-steps", "0"]) == 2  # only a continued run may skip the VAE
    assert main([str(tmp_path / "new"), "--init-from", str(tmp_path / "full")]) == 2  # no training_log.json
    assert main([str(tmp_path / "new"), "--tiny", "--shape-weight", "hexagon=2"]) == 2
    assert main([str(tmp_path / "new"), "--tiny", "--shape-weight", "star=0"]) == 2
    assert main([str(tmp_path / "new"), "--tiny", "--shape-weight", "star"]) == 2
    assert main([str(tmp_path / "new"), "--tiny", "--teacher", str(tmp_path / "full")]) == 2  # no distillation
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- the committed model

def test_committed_model_is_small_and_complete():
    files = [os.path.join(d, f) for d, _, fs in os.walk(MODEL) for f in fs]
    assert sum(os.path.getsize(f) for f in files) < 25 * 2 ** 20
    cfg = json.loads(open(os.path.join(MODEL, "transformer", "config.json")).read())
    assert cfg["num_layers"] + cfg["num_single_layers"] >= 16
    vae = json.loads(open(os.path.join(MODEL, "vae", "config.json")).read())
    assert vae["latent_channels"] == 16 and 64 // 2 ** (len(vae["block_out_channels"]) - 1) // 2 >= 8  # >= 8x8 tokens


@pytest.fixture(scope="module")
def trained_pipelines():
    from diffusers import FluxPipeline as TorchFluxPipeline
    from pipelines.flux_pipeline import FluxPipeline

    return (FluxPipeline.from_pretrained(MODEL, mode="graph"),
            TorchFluxPipeline.from_pretrained(MODEL, torch_dtype=torch.float32))


def test_committed_model_matches_diffusers(trained_pipelines):
    ours, ref = trained_pipelines
    prompts = [s.caption for s in heldout_prompts(n_one=2, n_two=1)[:2]] + [heldout_prompts()[500].caption]
    kw = dict(prompt=prompts, height=64, width=64, num_inference_steps=6, max_sequence_length=32,
              negative_prompt="", true_cfg_scale=2.0)
    tokens = (64 // (2 * ours.vae_scale_factor)) ** 2
    latents = np.random.default_rng(0).standard_normal((3, tokens, 64)).astype(np.float32)
    with torch.no_grad():
        expected = ref(latents=torch.from_numpy(latents), output_type="latent", return_dict=False, **kw)[0].numpy()
        expected_images = ref(latents=torch.from_numpy(latents), output_type="np", **kw).images
    got = ours(latents=latents, output_type="latent", progress=False, **kw).images
    assert rel_err(got, expected) < 1e-4
    images = ours(latents=latents, output_type="np", progress=False, **kw).images
    assert np.abs(images.astype(int) - (expected_images * 255).round().astype(int)).max() <= 1


def test_committed_model_draws_its_prompts(trained_pipelines):
    # A regression guard at the committed model's measured level (held-out one-object prompts, guidance 3.5:
    # colour and position 100%, size 98.4%, shape 93.4% by reader v2: README, "The embedded model"), not the
    # issue's target. The counts below were measured again with reader v2: unchanged.
    ours, _ = trained_pipelines
    scenes = heldout_prompts(n_one=8, n_two=0)
    out = ours([s.caption for s in scenes], height=64, width=64, num_inference_steps=28, max_sequence_length=32,
               generator=[np.random.default_rng(i) for i in range(len(scenes))], output_type="np", progress=False)
    scores = [adherence.score(s, im) for s, im in zip(scenes, out.images)]
    assert sum(r["colour"] for r in scores) >= 7, scores  # measured 8 of 8 on these seeds
    assert sum(r["position"] for r in scores) >= 7, scores  # measured 8 of 8
    assert sum(r["size"] for r in scores) >= 6, scores  # measured 7 of 8
    assert sum(r["shape"] for r in scores) >= 6, scores  # measured 7 of 8 (chance: 1.3; run 3's model: 4)


def test_snapshots_are_complete_loadable_folders_and_go_away_after_the_run(tmp_path, monkeypatch):
    import shutil
    from diffusers import FluxTransformer2DModel
    from eval import train_shapes_model as tsm

    seen, replace = [], tsm.replace_folder

    def keep_a_copy(src, dst):
        replace(src, dst)
        if dst.endswith(".partial"):
            seen.append(tmp_path / f"seen{len(seen)}")
            shutil.copytree(dst, seen[-1])

    monkeypatch.setattr(tsm, "replace_folder", keep_a_copy)
    tsm.train(_train_args(tmp_path / "model", **{"vae-steps": 4, "steps": 5, "snapshot-every": 2}))
    assert len(seen) == 2 and not (tmp_path / "model.partial").exists()
    assert not any(n.startswith((".snapshot-", ".replaced-")) for n in os.listdir(tmp_path))
    weights = []
    for folder, step in zip(seen, (1, 3)):
        assert sorted(os.listdir(folder)) == sorted(["model_index.json", "scheduler", "text_encoder", "text_encoder_2",
                                                     "tokenizer", "tokenizer_2", "transformer", "vae",
                                                     "training_log.json"])
        log = json.loads((folder / "training_log.json").read_text())
        assert log["snapshot_step"] == step and len(log["transformer_history"]) == step + 1
        assert log["phases"][-1]["steps"] == step + 1  # the phase as far as it went
        weights.append(FluxTransformer2DModel.from_pretrained(str(folder / "transformer")).proj_out.weight)
    assert not torch.equal(weights[0], weights[1])


def test_adaln_zero_start_predicts_zero_and_still_learns():
    from diffusers import FluxTransformer2DModel
    from eval.train_shapes_model import zero_init_modulation

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=8,
                                   pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    zero_init_modulation(torch, model)
    inputs = dict(hidden_states=torch.randn(2, 4, 16), encoder_hidden_states=torch.randn(2, 3, 8),
                  pooled_projections=torch.randn(2, 8), timestep=torch.tensor([0.3, 0.7]),
                  img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3), return_dict=False)
    assert torch.count_nonzero(model(**inputs)[0]) == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # the output layer moves first, then the gates it makes visible
        loss = (model(**inputs)[0] - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model(**inputs)[0].abs().mean() > 0.05
    assert model.transformer_blocks[0].norm1.linear.weight.abs().sum() > 0


def test_guidance_embedder_starts_at_zero_and_the_target_is_true_cfg():
    from diffusers import FluxTransformer2DModel
    from eval.train_shapes_model import add_guidance_embedder, guided_target

    torch.manual_seed(0)
    teacher = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=8,
                                     pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()
    student = add_guidance_embedder(torch, teacher).eval()
    assert student.config.guidance_embeds and not teacher.config.guidance_embeds
    inputs = dict(hidden_states=torch.randn(2, 4, 16), encoder_hidden_states=torch.randn(2, 3, 8),
                  pooled_projections=torch.randn(2, 8), timestep=torch.tensor([0.3, 0.7]),
                  img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3), return_dict=False)
    with torch.no_grad():
        expected = teacher(**inputs)[0]
        for g in (1.0, 4.0):  # before training, the guidance changes nothing
            torch.testing.assert_close(student(**inputs, guidance=torch.full((2,), g))[0], expected)
        empty = (torch.randn(1, 3, 8), torch.randn(1, 8))
        uncond = teacher(**dict(inputs, encoder_hidden_states=empty[0].expand(2, 3, 8),
                                pooled_projections=empty[1].expand(2, 8)))[0]
    g = torch.tensor([1.0, 3.0])
    target = guided_target(torch, teacher, inputs["hidden_states"], inputs["encoder_hidden_states"],
                           inputs["pooled_projections"], empty, inputs["timestep"], g, inputs["img_ids"],
                           inputs["txt_ids"])
    torch.testing.assert_close(target[0], expected[0], atol=1e-5, rtol=1e-5)  # g = 1: the conditional velocity
    torch.testing.assert_close(target[1], uncond[1] + 3 * (expected[1] - uncond[1]), atol=1e-5, rtol=1e-5)


def test_guidance_distillation_writes_a_dev_style_model(tmp_path):
    from safetensors.numpy import load_file
    from eval.train_shapes_model import train

    train(_train_args(tmp_path / "a", **{"vae-steps": 10, "steps": 6}))
    record = train(_train_args(tmp_path / "b", **{"init-from": tmp_path / "a", "vae-steps": 0, "steps": 6,
                                                  "distill-guidance": 4}))
    assert [h["step"] for h in record["transformer_history"]] == list(range(12))
    assert json.loads((tmp_path / "b" / "transformer" / "config.json").read_text())["guidance_embeds"]
    weights = load_file(str(tmp_path / "b" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert np.abs(weights["time_text_embed.guidance_embedder.linear_2.weight"]).sum() > 0  # it learned from g
    from eval.train_shapes_model import check_args
    with pytest.raises(ValueError, match="guidance-distilled"):
        check_args(_train_args(tmp_path / "c", **{"init-from": tmp_path / "b", "vae-steps": 0}))
    with pytest.raises(ValueError, match="must be a base model"):
        check_args(_train_args(tmp_path / "c", **{"init-from": tmp_path / "b", "vae-steps": 0,
                                                  "distill-guidance": 4, "teacher": tmp_path / "b"}))

    # a distilled model continues its distillation with its base model as the teacher, on star-heavy batches
    record = train(_train_args(tmp_path / "c", **{"init-from": tmp_path / "b", "vae-steps": 0, "steps": 4,
                                                  "distill-guidance": 4, "teacher": tmp_path / "a",
                                                  "shape-weight": "star=3"}))
    assert [h["step"] for h in record["transformer_history"]] == list(range(16))
    assert record["phases"][-1]["teacher"] == str(tmp_path / "a")
    again = load_file(str(tmp_path / "c" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert any(not np.array_equal(weights[k], again[k]) for k in weights)
