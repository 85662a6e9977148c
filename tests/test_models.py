"""Loading tiny iCD models (official file formats), their conditioning, the pipeline, manifests and latents."""

import json
import logging
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.tiny import build_tiny_model
from icd import editing, pipeline
from icd.app.session import Session, open_session, teacher_session
from icd.core.consistency import add_noise, consistency_jump
from icd.core.denoiser import Guided
from icd.errors import ICDError, InputError, ModelError, OutputExistsError, UsageError
from icd.latents import FORMAT, LatentInfo, load_latent, save_latent
from icd.models.hub import resolve_model
from icd.models.loading import Model, load_teacher, unet_config
from icd.models.manifest import load_manifest, parse_manifest
from icd.models.official import LORA_TARGETS
from icd.editing import edit_plan

SIZE = 64  # a multiple of the tiny models' 32: latents 8x8 -> 4x4 -> 2x2 in the UNet


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: build_tiny_model(root / kind, kind=kind).parent for kind in ("sd15", "sdxl")}


@pytest.fixture(scope="session")
def sd15(tiny_dirs):
    """The tiny SD1.5 model opened on PyTorch (a Session: the pipeline's runtime; its parts are in .model)."""
    return open_session(load_manifest(tiny_dirs["sd15"]), "cpu", "fp32", "torch")


@pytest.fixture(scope="session")
def sdxl(tiny_dirs):
    return open_session(load_manifest(tiny_dirs["sdxl"]), "cpu", "fp32", "torch")


@pytest.fixture(scope="session")
def pixels():
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5)) * 2 - 1


@pytest.fixture(scope="session")
def x_T(sd15, pixels):
    return pipeline.invert(sd15, pixels, "a cat", seed=1)


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --- manifest and loading -------------------------------------------------------------------------------

def test_manifest_of_tiny_model(tiny_dirs):
    manifest = load_manifest(tiny_dirs["sd15"])
    assert manifest.kind == "sd15" and manifest.name == "tiny-sd15"
    assert manifest.forward_timesteps == (19, 259, 519, 779)
    assert manifest.reverse_timesteps == (259, 519, 779, 999)
    assert manifest.lora_alpha == 8.0 and manifest.guidance_embed_dim == 512 and manifest.resolution == 128
    assert manifest.teacher == (tiny_dirs["sd15"] / "teacher.pt").resolve()
    assert manifest.base == str((tiny_dirs["sd15"] / "base").resolve())
    assert load_manifest(tiny_dirs["sd15"] / "icd.json") == manifest


def test_open_session_is_cached(sd15, tiny_dirs):
    assert open_session(load_manifest(tiny_dirs["sd15"]), "cpu", "fp32", "torch") is sd15
    assert sd15.engine.name == "torch" and sd15.engine.compile_mode is None
    assert sd15.model.dtype == torch.float32 and sd15.model.device == torch.device("cpu")


def test_teacher_has_cond_proj_and_the_pt_weights(sd15, tiny_dirs):
    teacher = load_teacher(sd15.manifest, sd15.model.unet_config)
    assert teacher.config.time_cond_proj_dim == 512
    proj = teacher.time_embedding.cond_proj
    assert isinstance(proj, torch.nn.Linear) and proj.in_features == 512 and proj.out_features == 32 and proj.bias is None
    saved = torch.load(tiny_dirs["sd15"] / "teacher.pt", weights_only=True)
    state = teacher.state_dict()
    assert set(state) == set(saved)
    assert torch.equal(state["time_embedding.cond_proj.weight"], saved["time_embedding.cond_proj.weight"])
    assert all(torch.equal(state[name], saved[name]) for name in saved)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())


def expected_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * sum_r B[o, r] A[r, ...] (B is (o, r) or (o, r, 1, 1))."""
    b = b.reshape(b.shape[0], b.shape[1], *([1] * (a.dim() - 1)))
    return scale * (b * a.unsqueeze(0)).sum(1)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_students_are_teacher_plus_lora(tiny_dirs, kind, request):
    model = request.getfixturevalue(kind)
    folder = tiny_dirs[kind]
    teacher = torch.load(folder / "teacher.pt", weights_only=True)
    forward, reverse = model.engine.unets(model.model, "forward", "reverse")
    assert forward is not reverse
    for unet, file in ((forward, "tiny-forward.safetensors"), (reverse, "tiny-reverse.safetensors")):
        assert not unet.training and not any(p.requires_grad for p in unet.parameters())
        lora = load_file(str(folder / file))
        adapted = {key[len("unet.base_model.model."):-len(".lora_A.weight")] for key in lora if key.endswith("lora_A.weight")}
        assert len(adapted) == len(lora) // 2 > 50
        assert all(name.endswith(LORA_TARGETS) for name in adapted)
        state = unet.state_dict()
        for name, value in teacher.items():
            module = name.rsplit(".", 1)[0]
            if module in adapted and name.endswith(".weight"):
                prefix = f"unet.base_model.model.{module}"
                delta = expected_delta(lora[f"{prefix}.lora_A.weight"], lora[f"{prefix}.lora_B.weight"], 8 / 4)
                assert torch.allclose(state[name] - value, delta, atol=1e-5), name
                assert delta.abs().max() > 0.1
            else:
                assert torch.equal(state[name], value), name


# --- text conditioning ----------------------------------------------------------------------------------

PROMPTS = ["a cat", "a dog on a red sofa"]


def test_sd15_conditioning_is_last_hidden_state(sd15):
    cond = sd15.model.encode_text(PROMPTS, (SIZE, SIZE))
    assert cond.embeds.shape == (2, 77, 32)
    assert cond.pooled is None and cond.time_ids is None
    tokenizer, encoder = sd15.model.tokenizers[0], sd15.model.text_encoders[0]
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = encoder(ids).last_hidden_state
    assert torch.equal(cond.embeds, expected)
    assert not torch.allclose(cond.embeds[0], cond.embeds[1])
    assert cond.unet_kwargs().keys() == {"encoder_hidden_states"}


def test_sdxl_conditioning(sdxl):
    cond = sdxl.model.encode_text(PROMPTS, (96, 64))  # (width, height)
    assert cond.embeds.shape == (2, 77, 64)
    assert cond.pooled.shape == (2, 32)
    assert cond.time_ids.tolist() == [[64, 96, 0, 0, 64, 96]] * 2
    hidden, pooled = [], None
    with torch.no_grad():
        for tokenizer, encoder in zip(sdxl.model.tokenizers, sdxl.model.text_encoders):
            ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds
    assert torch.equal(cond.embeds, torch.cat(hidden, dim=-1))
    assert not torch.equal(cond.embeds[..., :32], out.last_hidden_state)  # penultimate, not last
    assert torch.equal(cond.pooled, pooled)
    assert cond.unet_kwargs()["added_cond_kwargs"]["time_ids"] is cond.time_ids


def test_conditioning_rows(sdxl):
    cond = sdxl.model.encode_text(PROMPTS, (SIZE, SIZE))
    first, second = cond.rows(slice(0, 1)), cond.rows([1])
    assert first.embeds.shape == (1, 77, 64) and first.pooled.shape == (1, 32) and first.time_ids.shape == (1, 6)
    assert torch.equal(second.embeds[0], cond.embeds[1]) and torch.equal(second.pooled[0], cond.pooled[1])


def test_long_prompt_warns(sd15, caplog):
    # pytest also captures from non-propagating loggers, as "icd" is once the CLI has set up its logging
    long_prompt = " ".join(["abcdefghij"] * 10)  # the tiny tokenizer is per character: 100 tokens + 2
    with caplog.at_level(logging.WARNING, logger="icd"):
        sd15.model.encode_text(["a cat"], (SIZE, SIZE))
        assert caplog.records == []
        cond = sd15.model.encode_text([long_prompt], (SIZE, SIZE))
    records = [r for r in caplog.records if r.name == "icd"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "102 tokens" in records[0].getMessage() and "77" in records[0].getMessage()
    assert cond.embeds.shape == (1, 77, 32)


# --- VAE and sizes --------------------------------------------------------------------------------------

def test_encode_image_is_scaled_posterior_mean(sd15, pixels):
    latents = sd15.model.encode_image(pixels)
    assert latents.shape == (1, 4, 8, 8) and latents.dtype == torch.float32
    with torch.no_grad():
        mean = sd15.model.vae.encode(pixels).latent_dist.mean
    assert sd15.model.vae.config.scaling_factor == pytest.approx(0.18215)
    assert torch.equal(latents, mean * 0.18215)
    assert torch.equal(sd15.model.encode_image(pixels), latents)  # the mean, not a sample


def test_decode_latents_range_and_shape(sd15):
    out = sd15.model.decode_latents(torch.randn(2, 4, 8, 12) * 5)
    assert out.shape == (2, 3, 64, 96)
    assert out.min() >= -1 and out.max() <= 1


def test_sizes(sd15, sdxl):
    for model in (sd15.model, sdxl.model):
        assert model.vae_scale_factor == 8
        assert model.size_multiple == 32
        assert model.latent_shape(160, 96) == (1, 4, 12, 20)
        assert model.latent_shape(64, 128, batch=3) == (3, 4, 16, 8)


def with_vae_upcast(tiny_dirs, tmp_path, kind: str, force_upcast: bool | None):
    """A copy of a tiny model whose VAE config sets force_upcast, or lacks it (None: as SD1.5's published one)."""
    shutil.copytree(tiny_dirs[kind], tmp_path / kind)
    config_path = tmp_path / kind / "base" / "vae" / "config.json"
    config = {key: value for key, value in json.loads(config_path.read_text()).items() if key != "force_upcast"}
    config_path.write_text(json.dumps(config if force_upcast is None else {**config, "force_upcast": force_upcast}))
    return load_manifest(tmp_path / kind)


FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.mark.parametrize("kind, force_upcast, vae_dtypes", [
    ("sd15", None, (FP32, FP16, BF16)),  # a missing flag reads as true, yet SD1.5's VAE is fp16-safe
    ("sd15", True, (FP32, FP16, BF16)),  # the flag as diffusers writes its default (mini's config)
    ("sdxl", True, (FP32, FP32, BF16)),  # the SDXL base VAE overflows in fp16; bf16 has fp32's range
    ("sdxl", None, (FP32, FP32, BF16)),
    ("sdxl", False, (FP32, FP16, BF16)),  # an fp16-safe VAE (sdxl-vae-fp16-fix) says so
])
def test_vae_runs_in_the_run_dtype_unless_sdxl_under_fp16(tiny_dirs, tmp_path, kind, force_upcast, vae_dtypes):
    manifest = with_vae_upcast(tiny_dirs, tmp_path, kind, force_upcast)
    for dtype, vae_dtype in zip((FP32, FP16, BF16), vae_dtypes):
        model = Model.load(manifest, torch.device("cpu"), dtype)
        assert (model.vae.dtype, model.text_encoders[0].dtype) == (vae_dtype, dtype)


def test_a_vae_named_by_the_manifest_replaces_the_bases(tiny_dirs, tmp_path, caplog):
    """An fp16-safe SDXL VAE named in icd.json (a folder here; a hub id is fetched by `icd pull --vae`) runs in
    fp16 where the base's would be upcast, and is part of the model's fingerprint."""
    from diffusers import AutoencoderKL

    base = load_manifest(tiny_dirs["sdxl"])
    folder = shutil.copytree(tiny_dirs["sdxl"], tmp_path / "sdxl")
    safe = AutoencoderKL.from_pretrained(folder / "base" / "vae", force_upcast=False)
    torch.nn.init.constant_(safe.decoder.conv_out.bias, 0.25)
    safe.save_pretrained(folder / "fp16-vae")
    fields = json.loads((folder / "icd.json").read_text())
    (folder / "icd.json").write_text(json.dumps({**fields, "vae": "fp16-vae"}))
    manifest = load_manifest(folder)
    assert manifest.vae == str((folder / "fp16-vae").resolve()) and manifest.fingerprint != base.fingerprint
    with caplog.at_level(logging.INFO, logger="icd"):
        vae = Model.load(manifest, torch.device("cpu"), FP16).vae
        assert vae.dtype == FP16 and torch.equal(vae.decoder.conv_out.bias, torch.full((3,), 0.25, dtype=FP16))
        assert "icd" not in [name for name, _, _ in caplog.record_tuples]
        assert Model.load(base, torch.device("cpu"), FP16).vae.dtype == FP32
    assert [message for name, _, message in caplog.record_tuples if name == "icd"] == [
        "SDXL's VAE runs in fp32 under fp16 (its config forces it: it overflows in fp16); an fp16-safe VAE saves "
        "that time (`icd pull sdxl --vae madebyollin/sdxl-vae-fp16-fix`), as does --dtype bf16"]
    (folder / "icd.json").write_text(json.dumps({**fields, "vae": "nobody/no-such-vae"}))
    with pytest.raises(ModelError) as err:
        Model.load(load_manifest(folder), torch.device("cpu"), FP16)
    assert one_line(err).startswith("cannot load the weights of VAE nobody/no-such-vae (not in the Hugging Face "
                                    "cache: `icd pull` a preset, or `hf download nobody/no-such-vae`): ")


def encoder_batches(model: Model) -> list[int]:
    """The batch size of each call of the model's (first) text encoder from now on."""
    batches = []
    model.text_encoders[0].register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    return batches


def test_each_prompt_is_encoded_once_and_kept(tiny_dirs):
    model = Model.load(load_manifest(tiny_dirs["sd15"]), torch.device("cpu"), torch.float32)
    batches = encoder_batches(model)
    source = model.encode_text(["a cat"], (SIZE, SIZE))  # as the inversion does
    both = model.encode_text(["a cat", "a dog"], (SIZE, SIZE))  # then the edit
    assert batches == [1, 1]  # "a dog" alone: "a cat" was kept
    assert torch.equal(both.embeds[:1], source.embeds)
    with torch.inference_mode():
        both.embeds.add_(1.0)  # a caller writing into its result does not reach the kept rows
    again = model.encode_text(["a dog", "a cat", "a dog"], (SIZE, SIZE))
    assert batches == [1, 1] and torch.equal(again.embeds[1:2], source.embeds)
    model.encode_text([f"prompt {i}" for i in range(Model.PROMPTS_KEPT)], (SIZE, SIZE))
    assert batches == [1, 1, Model.PROMPTS_KEPT]
    model.encode_text(["a dog", "a cat"], (SIZE, SIZE))  # the oldest were dropped: kept rows are bounded
    assert batches == [1, 1, Model.PROMPTS_KEPT, 2]


def test_sdxl_prompts_are_kept_per_size(tiny_dirs):
    model = Model.load(load_manifest(tiny_dirs["sdxl"]), torch.device("cpu"), torch.float32)
    batches = encoder_batches(model)
    square, wide = model.encode_text(["a cat"], (SIZE, SIZE)), model.encode_text(["a cat"], (96, 64))
    assert model.encode_text(["a cat"], (96, 64)).time_ids.tolist() == wide.time_ids.tolist() == [[64, 96, 0, 0, 64, 96]]
    assert square.time_ids.tolist() == [[SIZE, SIZE, 0, 0, SIZE, SIZE]]
    assert batches == [1, 1]


# --- the denoiser ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, tolerance", [("sd15", 1e-5), ("sdxl", 5e-5)])
def test_denoiser_guidance_per_row(kind, tolerance, request):
    session = request.getfixturevalue(kind)
    denoiser = session.denoiser("reverse")
    assert isinstance(denoiser, Guided) and denoiser.embed_dim == 512
    assert session.denoiser("reverse") is denoiser  # made once
    cond = session.model.encode_text(["a cat"] * 2, (SIZE, SIZE))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)).expand(2, -1, -1, -1)
    both = denoiser(x, 779, cond, torch.tensor([0.0, 7.0]))
    alone0 = denoiser(x[:1], 779, cond.rows(slice(0, 1)), torch.tensor([0.0]))
    alone7 = denoiser(x[:1], 779, cond.rows(slice(0, 1)), torch.tensor([7.0]))
    assert both.shape == (2, 4, 8, 8)
    assert (both[0] - alone0[0]).abs().max().item() < tolerance
    assert (both[1] - alone7[0]).abs().max().item() < tolerance
    assert (alone0 - alone7).abs().max().item() > 1e-3  # the embedding matters


# --- pipeline -------------------------------------------------------------------------------------------

def test_invert_is_deterministic_per_seed(sd15, pixels, x_T):
    assert x_T.shape == (1, 4, 8, 8) and x_T.dtype == torch.float32 and x_T.device.type == "cpu"
    assert torch.equal(pipeline.invert(sd15, pixels, "a cat", seed=1), x_T)
    assert not torch.allclose(pipeline.invert(sd15, pixels, "a cat", seed=2), x_T, atol=1e-3)


def test_invert_is_the_forward_loop_written_out(sd15, pixels, x_T):
    """z0 = VAE mean; x_19 = add_noise(z0, seeded noise); forward jumps 19->259->519->779->999 at w = 0."""
    denoiser = sd15.denoiser("forward")
    cond = sd15.model.encode_text(["a cat"], (SIZE, SIZE))
    z0 = sd15.model.encode_image(pixels)
    x = add_noise(z0, torch.randn(z0.shape, generator=torch.Generator().manual_seed(1)), 19)
    for t, s in ((19, 259), (259, 519), (519, 779), (779, 999)):
        x = consistency_jump(x, denoiser(x, t, cond, torch.tensor([0.0])), t, s)
    assert torch.equal(x, x_T)


def test_generate_is_the_reverse_loop_written_out(sd15):
    """Seeded noise at 999, then 999->779->519->259->0 with a constant w = 7 (the generation default)."""
    denoiser = sd15.denoiser("reverse")
    cond = sd15.model.encode_text(["a red fox"], (96, 64))
    x = torch.randn((1, 4, 8, 12), generator=torch.Generator().manual_seed(11))
    for t, s in ((999, 779), (779, 519), (519, 259), (259, 0)):
        x = consistency_jump(x, denoiser(x, t, cond, torch.tensor([7.0])), t, s)
    assert torch.equal(pipeline.generate(sd15, "a red fox", seed=11, width=96, height=64), sd15.model.decode_latents(x))


def test_seeded_noise():
    a = pipeline.seeded_noise((1, 4, 8, 8), 7)
    assert torch.equal(a, torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(a, pipeline.seeded_noise((1, 4, 8, 8), 8))


def test_reconstruct_is_deterministic(sd15, x_T):
    first = pipeline.reconstruct(sd15, x_T, "a cat")
    assert first.shape == (1, 3, SIZE, SIZE)
    assert first.min() >= -1 and first.max() <= 1
    assert torch.equal(pipeline.reconstruct(sd15, x_T, "a cat"), first)
    assert not torch.equal(pipeline.reconstruct(sd15, x_T, "a cat", guidance=7.0), first)


def test_edit_none_with_source_prompt_is_reconstruction(sd15, x_T):
    result = pipeline.edit(sd15, x_T, edit_plan(sd15.manifest, "a cat", "a cat", method="none", guidance=0.0))
    assert result.reconstruction is None
    assert torch.equal(result.edited, pipeline.reconstruct(sd15, x_T, "a cat", guidance=0.0))


def test_edit_swap(sd15, x_T):
    none = pipeline.edit(sd15, x_T, edit_plan(sd15.manifest, "a cat", "a dog", method="none", guidance=7.0, tau=1.0)).edited
    # tau 1: every step is below tau, so every step uses the target: the same as 'none'
    swap = pipeline.edit(sd15, x_T, edit_plan(sd15.manifest, "a cat", "a dog", method="swap", guidance=7.0, tau=1.0))
    assert swap.reconstruction is None and swap.edited.shape == (1, 3, SIZE, SIZE)
    assert torch.equal(swap.edited, none)
    # tau 0: every step is above tau: the source prompt, unguided, on all of them
    all_source = pipeline.edit(sd15, x_T, edit_plan(sd15.manifest, "a cat", "a dog", method="swap", guidance=7.0, tau=0.0)).edited
    assert torch.equal(all_source, pipeline.edit(sd15, x_T, edit_plan(sd15.manifest, "a cat", "a cat", method="none", guidance=0.0)).edited)
    # tau 0.8: the source at 999 only; differs from both
    mixed = pipeline.edit(sd15, x_T, edit_plan(sd15.manifest, "a cat", "a dog", method="swap", guidance=7.0, tau=0.8)).edited
    assert not torch.equal(mixed, none) and not torch.equal(mixed, all_source)


def test_edit_p2p(sd15, x_T):
    result = pipeline.edit(sd15, x_T, edit_plan(sd15.manifest, "a cat", "a dog", method="p2p", cross_replace=0.5, self_replace=0.5))
    assert result.edited.shape == (1, 3, SIZE, SIZE) and result.reconstruction.shape == (1, 3, SIZE, SIZE)
    # the source row is the unguided reconstruction (through P2P's own attention path: equal to rounding)
    reconstruction = pipeline.reconstruct(sd15, x_T, "a cat", guidance=0.0)
    assert (result.reconstruction - reconstruction).abs().max().item() < 1e-4
    assert (result.edited - result.reconstruction).abs().max().item() > 1e-3
    # attention processors are restored afterwards
    (unet,) = sd15.engine.unets(sd15.model, "reverse")
    assert not any(type(p).__name__ == "_Processor" for p in unet.attn_processors.values())


def test_edit_defaults_and_unknown_method(sd15, sdxl, x_T):
    def settings(manifest, **given):
        plan = editing.edit_plan(manifest, "a cat", "a dog", **given)
        return editing.EditDefaults(plan.method, plan.guidance, plan.tau)

    assert editing.model_defaults(sd15.manifest) == editing.EditDefaults("p2p", 19.0, 0.8)
    assert settings(sd15.manifest) == editing.EditDefaults("p2p", 19.0, 0.8)
    assert settings(sdxl.manifest) == editing.EditDefaults("swap", 19.0, 0.7)
    assert settings(sdxl.manifest, method="none", guidance=0.0, tau=None) == editing.EditDefaults("none", 0.0, 0.7)
    own = replace(sd15.manifest, edit_defaults=(("guidance", 4.0),))
    assert settings(own) == editing.EditDefaults("p2p", 4.0, 0.8)
    assert settings(own, guidance=2.0) == editing.EditDefaults("p2p", 2.0, 0.8)
    with pytest.raises(ICDError) as err:
        pipeline.edit(sd15, x_T, edit_plan(sd15.manifest, "a cat", "a dog", method="magic"))
    assert "magic" in one_line(err)


def test_guidance_on_steps(sd15):
    assert editing.guidance_on_steps(sd15.manifest, 19.0, 0.8) == [(999, 0.0), (779, 19.0), (519, 19.0), (259, 19.0)]


def test_generate_is_deterministic(sd15):
    first = pipeline.generate(sd15, "a cat", seed=3, width=96, height=64)
    assert first.shape == (1, 3, 64, 96)
    assert torch.equal(pipeline.generate(sd15, "a cat", seed=3, width=96, height=64), first)
    assert not torch.allclose(pipeline.generate(sd15, "a cat", seed=4, width=96, height=64), first, atol=1e-3)


def test_sdxl_invert_edit(sdxl, pixels):
    x = pipeline.invert(sdxl, pixels, "a cat", seed=1)
    assert x.shape == (1, 4, 8, 8)
    assert torch.equal(pipeline.invert(sdxl, pixels, "a cat", seed=1), x)
    result = pipeline.edit(sdxl, x, edit_plan(sdxl.manifest, "a cat", "a dog"))  # the SDXL default: swap
    assert result.reconstruction is None and result.edited.shape == (1, 3, SIZE, SIZE)
    same = pipeline.edit(sdxl, x, edit_plan(sdxl.manifest, "a cat", "a cat", method="none", guidance=0.0))
    # not bitwise: the pooled vector of a 2-prompt batch differs from a 1-prompt one in the last bit
    assert (same.edited - pipeline.reconstruct(sdxl, x, "a cat")).abs().max().item() < 1e-3
    assert (result.edited - same.edited).abs().max().item() > 1e-3


# --- manifest errors ------------------------------------------------------------------------------------

def manifest_data(folder) -> dict:
    data = json.loads((folder / "icd.json").read_text())
    for key in ("base", "teacher", "forward_lora", "reverse_lora"):
        data[key] = str(folder / data[key])  # absolute, so the manifest can live anywhere
    return data


def write_manifest(tmp_path, data):
    path = tmp_path / "icd.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("change, fragments", [
    ({"teacher": "missing-teacher.pt"}, ["teacher", "not found", "missing-teacher.pt"]),
    ({"reverse_lora": "gone.safetensors"}, ["reverse_lora", "not found"]),
    ({"kind": "sd3"}, ["field 'kind': Input should be 'sd15' or 'sdxl' (got 'sd3')"]),
    ({"kind": None}, ["'kind'"]),
    ({"base": ""}, ["'base'"]),
    ({"forward_timesteps": [0, 259, 519]}, ["'forward_timesteps'"]),
    ({"forward_timesteps": [19, 1000]}, ["'forward_timesteps'"]),
    ({"reverse_timesteps": "259,519"}, ["'reverse_timesteps'"]),
    ({"reverse_timesteps": [259.0, 999]}, ["'reverse_timesteps'"]),
    ({"reverse_timesteps": []}, ["'reverse_timesteps'"]),
    ({"guidance_embed_dim": 511}, ["'guidance_embed_dim'"]),
    ({"resolution": "big"}, ["'resolution'"]),
])
def test_manifest_errors_name_the_field(tiny_dirs, tmp_path, change, fragments):
    data = {**manifest_data(tiny_dirs["sd15"]), **change}
    path = write_manifest(tmp_path, data)
    with pytest.raises(ModelError) as err:
        load_manifest(path)
    message = one_line(err)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_manifest_missing_timesteps(tiny_dirs, tmp_path):
    data = manifest_data(tiny_dirs["sd15"])
    del data["forward_timesteps"]
    with pytest.raises(ModelError) as err:
        load_manifest(write_manifest(tmp_path, data))
    assert "'forward_timesteps'" in one_line(err)


def test_manifest_timesteps_sorted_and_defaults(tiny_dirs, tmp_path):
    data = manifest_data(tiny_dirs["sd15"])
    data["reverse_timesteps"] = [999, 259, 779, 519]
    for key in ("lora_alpha", "resolution", "guidance_embed_dim", "name"):
        del data[key]
    manifest = load_manifest(write_manifest(tmp_path, data))
    assert manifest.reverse_timesteps == (259, 519, 779, 999)
    assert manifest.lora_alpha == 8.0 and manifest.resolution == 512 and manifest.guidance_embed_dim == 512
    assert manifest.name == tmp_path.name


def test_manifest_unreadable(tmp_path):
    with pytest.raises(ModelError) as err:
        load_manifest(tmp_path)
    assert "no model manifest" in one_line(err)
    (tmp_path / "icd.json").write_text("{not json")
    with pytest.raises(ModelError) as err:
        load_manifest(tmp_path)
    assert "not a readable JSON manifest" in one_line(err)
    (tmp_path / "icd.json").write_text("[1, 2]")
    with pytest.raises(ModelError) as err:
        load_manifest(tmp_path)
    assert "JSON object" in one_line(err)


def test_resolve_model_unknown_name_lists_presets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ICD_HOME", str(tmp_path / "home"))
    with pytest.raises(UsageError) as err:
        resolve_model("no-such-model")
    message = one_line(err)
    assert "unknown model 'no-such-model'" in message
    # the presets, their aliases and the shipped model; the tiny test models are no presets any more, they
    # are found (like `icd bench --random-weights` models) in the cache's models folder, which is named
    for name in ("sd15-4step-259", "sdxl-4step-249", "sd15", "sdxl", "mini"):
        assert name in message
    assert "tiny" not in message
    assert message.endswith(f"or a model in {tmp_path / 'home' / 'models'}")


def test_resolve_model_folder(tiny_dirs):
    assert resolve_model(str(tiny_dirs["sdxl"])) == load_manifest(tiny_dirs["sdxl"])


def model_with_teacher(tiny_dirs, tmp_path, teacher, **change):
    """A session of the tiny SD1.5 model with another teacher, UNets only (no text encoders or VAE)."""
    data = {**manifest_data(tiny_dirs["sd15"]), "teacher": str(teacher), **change}
    manifest = parse_manifest(data, tmp_path, str(tmp_path / "icd.json"))
    return Session(Model(manifest, torch.device("cpu"), torch.float32, unet_config(manifest)))


def unets_of(session: Session, *directions: str) -> list:
    return session.engine.unets(session.model, *directions)


def test_teacher_with_wrong_shape(tiny_dirs, tmp_path):
    state = torch.load(tiny_dirs["sd15"] / "teacher.pt", weights_only=True)
    state["conv_in.weight"] = torch.zeros(32, 4, 1, 1)
    torch.save(state, tmp_path / "wrong.pt")
    with pytest.raises(ModelError) as err:
        unets_of(model_with_teacher(tiny_dirs, tmp_path, tmp_path / "wrong.pt"), "reverse")
    message = one_line(err)
    assert "wrong.pt" in message and "sd15" in message and "conv_in.weight" in message


def test_teacher_of_the_other_kind(tiny_dirs, tmp_path):
    with pytest.raises(ModelError) as err:
        unets_of(model_with_teacher(tiny_dirs, tmp_path, tiny_dirs["sdxl"] / "teacher.pt"), "forward")
    assert "does not fit the sd15 UNet" in one_line(err)


def test_teacher_without_cond_proj(tiny_dirs, tmp_path):
    state = torch.load(tiny_dirs["sd15"] / "teacher.pt", weights_only=True)
    del state["time_embedding.cond_proj.weight"]
    torch.save(state, tmp_path / "plain.pt")
    with pytest.raises(ModelError) as err:
        unets_of(model_with_teacher(tiny_dirs, tmp_path, tmp_path / "plain.pt"), "forward")
    assert "time_embedding.cond_proj.weight" in one_line(err)


def test_teacher_not_a_state_dict(tiny_dirs, tmp_path):
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ModelError) as err:
        unets_of(model_with_teacher(tiny_dirs, tmp_path, tmp_path / "text.pt"), "forward")
    assert "text.pt: not a loadable teacher state dict" in one_line(err)


def test_teacher_as_safetensors(tiny_dirs, tmp_path, sd15):
    state = torch.load(tiny_dirs["sd15"] / "teacher.pt", weights_only=True)
    save_file(state, str(tmp_path / "teacher.safetensors"))
    (unet,) = unets_of(model_with_teacher(tiny_dirs, tmp_path, tmp_path / "teacher.safetensors"), "reverse")
    (reference,) = unets_of(sd15, "reverse")
    ours, theirs = unet.state_dict(), reference.state_dict()
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_teacher_corrupt_safetensors(tiny_dirs, tmp_path):
    (tmp_path / "teacher.safetensors").write_text("hello")
    with pytest.raises(ModelError) as err:
        unets_of(model_with_teacher(tiny_dirs, tmp_path, tmp_path / "teacher.safetensors"), "forward")
    assert "teacher.safetensors" in one_line(err)


def test_teacher_pickle_not_a_dict(tiny_dirs, tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ModelError) as err:
        unets_of(model_with_teacher(tiny_dirs, tmp_path, tmp_path / "tensor.pt"), "forward")
    assert "tensor.pt" in one_line(err)


def test_missing_lora_direction(tiny_dirs, tmp_path):
    with pytest.raises(ModelError) as err:
        unets_of(model_with_teacher(tiny_dirs, tmp_path, tiny_dirs["sd15"] / "teacher.pt", reverse_lora=None), "reverse")
    assert "has no reverse LoRA" in one_line(err)


# --- latent files ---------------------------------------------------------------------------------------

INFO = LatentInfo(model="tiny", model_fingerprint="0123456789abcdef", prompt="a cat on a mat", seed=30,
                  width=64, height=64, original_width=70, original_height=60, source="cat.png")


def test_latent_round_trip(tmp_path):
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "cat.safetensors"
    save_latent(path, latent, INFO)
    loaded, info = load_latent(path)
    assert torch.equal(torch.from_numpy(loaded), latent) and loaded.dtype == np.float32
    assert info == INFO
    with pytest.raises(OutputExistsError):
        save_latent(path, latent, INFO)
    save_latent(path, latent * 2, INFO, overwrite=True)
    assert torch.equal(torch.from_numpy(load_latent(path)[0]), latent * 2)
    assert [p.name for p in tmp_path.iterdir()] == ["cat.safetensors"]  # no temporary file left


def test_latent_fingerprint_of_model(tiny_dirs):
    manifest = load_manifest(tiny_dirs["sd15"])
    assert manifest.fingerprint == load_manifest(tiny_dirs["sd15"]).fingerprint
    assert manifest.fingerprint != load_manifest(tiny_dirs["sdxl"]).fingerprint
    assert len(manifest.fingerprint) == 16 and int(manifest.fingerprint, 16) >= 0


def test_latent_errors(tmp_path):
    other = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    with pytest.raises(InputError) as err:
        load_latent(other)
    assert "weights.safetensors: a safetensors file, but not an icd latent" in one_line(err)

    text = tmp_path / "notes.safetensors"
    text.write_text("just some text, not a tensor file")
    with pytest.raises(InputError) as err:
        load_latent(text)
    assert one_line(err).startswith("notes.safetensors: ")

    with pytest.raises(InputError) as err:
        load_latent(tmp_path / "absent.safetensors")
    assert "absent.safetensors: no such file" in one_line(err)

    wrong = tmp_path / "batch.safetensors"
    save_file({"latent": torch.zeros(2, 4, 8, 8)}, str(wrong), metadata={"format": FORMAT, "icd": json.dumps({})})
    with pytest.raises(InputError) as err:
        load_latent(wrong)
    assert one_line(err).startswith("batch.safetensors: ")

    shaped = tmp_path / "shape.safetensors"
    save_latent(shaped, torch.zeros(4, 8, 8), INFO)
    with pytest.raises(InputError) as err:
        load_latent(shaped)
    assert "expected (1, C, h, w)" in one_line(err)


def test_tiny_model_folder_is_complete(tiny_dirs):
    for kind, folder in tiny_dirs.items():
        names = {p.name for p in folder.iterdir()}
        assert names == {"base", "teacher.pt", "tiny-forward.safetensors", "tiny-reverse.safetensors", "icd.json"}
        assert not (folder.parent / f"{kind}.building").exists()


def test_teacher_solver_runs_the_teacher_on_the_ddim_grid(sd15):
    solver = teacher_session(sd15, 10)
    assert solver.manifest.forward_timesteps == (99, 199, 299, 399, 499, 599, 699, 799, 899)
    assert solver.manifest.reverse_timesteps == (99, 199, 299, 399, 499, 599, 699, 799, 899, 999)
    forward, reverse = solver.engine.unets(solver.model, "forward", "reverse")
    assert forward is reverse
    teacher = load_teacher(sd15.manifest, sd15.model.unet_config)
    assert all(torch.equal(value, teacher.state_dict()[key]) for key, value in forward.state_dict().items())
    assert sd15.manifest.forward_timesteps == (19, 259, 519, 779)  # the model itself is untouched
    assert solver.model.vae is sd15.model.vae and solver.model.text_encoders is sd15.model.text_encoders


def test_manifest_edit_defaults(tiny_dirs, tmp_path):
    data = {**manifest_data(tiny_dirs["sd15"]), "edit": {"guidance": 4.0, "tau": 0.6}}
    assert parse_manifest(data, tmp_path, "icd.json").edit_defaults == (("guidance", 4.0), ("tau", 0.6))
    with pytest.raises(ModelError) as err:
        parse_manifest({**data, "edit": {"strength": 1}}, tmp_path, "icd.json")
    assert one_line(err) == "icd.json: field 'edit.strength': Extra inputs are not permitted (got 1)"
