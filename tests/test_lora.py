"""LoRA fusion against peft itself: the official key format, the alpha/rank scale, kohya and diffusers keys."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from icd.errors import ModelError
from icd.models.lora import LoraLayer, fuse_lora, lora_delta, read_lora
from fixtures.tiny import tiny_unet_config

RANK, ALPHA = 4, 8  # scale 2.0, as the official rank 64 / alpha 8 is 0.125: alpha != rank on purpose
OFFICIAL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
CONV3 = "down_blocks.0.resnets.0.conv1"  # 3x3 conv
DOWNSAMPLER = "down_blocks.0.downsamplers.0.conv"  # 3x3 conv, stride 2
SHORTCUT = "down_blocks.1.resnets.0.conv_shortcut"  # 1x1 conv
PROJ_IN = "down_blocks.0.attentions.0.proj_in"  # 1x1 conv in SD1.5
TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # linear
PEFT_PREFIX = "unet.base_model.model."


@pytest.fixture(scope="module")
def base_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config("sd15"), time_cond_proj_dim=512).eval()


@pytest.fixture(scope="module")
def peft_model(base_unet):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base_unet), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=OFFICIAL_TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero: make the adapter do something
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def lora_tensors(peft_model):
    """The official file layout: get_peft_model_state_dict + 'unet.' prefix, no alpha."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    return {f"unet.{key}": value.detach().clone().contiguous() for key, value in state.items()}


@pytest.fixture(scope="module")
def lora_file(lora_tensors, tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "official.safetensors"
    save_file(lora_tensors, str(path))
    return path


@pytest.fixture(scope="module")
def unet_inputs():
    g = torch.Generator().manual_seed(2)
    return dict(
        sample=torch.randn(2, 4, 16, 16, generator=g),
        timestep=torch.tensor([999, 259]),
        encoder_hidden_states=torch.randn(2, 77, 32, generator=g),
        timestep_cond=torch.randn(2, 512, generator=g),
    )


def run_unet(unet, inputs):
    with torch.no_grad():
        return unet(**inputs, return_dict=False)[0]


def fused(base_unet, path, default_alpha=ALPHA):
    unet = copy.deepcopy(base_unet)
    count = fuse_lora(unet, path, default_alpha=default_alpha)
    return unet, count


def test_official_file_layout(lora_tensors):
    assert all(key.startswith(PEFT_PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight")) for key in lora_tensors)
    assert not any("alpha" in key for key in lora_tensors)
    assert lora_tensors[f"{PEFT_PREFIX}{CONV3}.lora_A.weight"].shape == (RANK, 32, 3, 3)
    assert lora_tensors[f"{PEFT_PREFIX}{CONV3}.lora_B.weight"].shape == (32, RANK, 1, 1)
    assert lora_tensors[f"{PEFT_PREFIX}{TO_Q}.lora_A.weight"].shape == (RANK, 32)


def test_fused_unet_matches_live_peft_model(base_unet, peft_model, lora_file, lora_tensors, unet_inputs):
    unet, count = fused(base_unet, lora_file)
    assert count == len(lora_tensors) // 2 == 128
    expected = run_unet(peft_model, unet_inputs)
    got = run_unet(unet, unet_inputs)
    plain = run_unet(base_unet, unet_inputs)
    assert (plain - expected).abs().max().item() > 1e-2  # the adapter really changes the output
    assert (got - expected).abs().max().item() < 1e-5


def test_scale_trap_alpha_equal_to_rank_is_wrong(base_unet, peft_model, lora_file, unet_inputs):
    """Read as alpha = rank (scale 1) instead of alpha 8 (scale 2): clearly a different UNet."""
    unet, _ = fused(base_unet, lora_file, default_alpha=RANK)
    expected = run_unet(peft_model, unet_inputs)
    lora_effect = (run_unet(base_unet, unet_inputs) - expected).abs().max().item()
    assert (run_unet(unet, unet_inputs) - expected).abs().max().item() > 0.1 * lora_effect


def test_untargeted_layers_are_untouched(base_unet, lora_file):
    unet, _ = fused(base_unet, lora_file)
    before, after = base_unet.state_dict(), unet.state_dict()
    for name in ("conv_in.weight", "conv_out.weight", "time_embedding.linear_1.weight",
                 "time_embedding.cond_proj.weight", "down_blocks.0.resnets.0.norm1.weight", f"{CONV3}.bias"):
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before[f"{CONV3}.weight"], after[f"{CONV3}.weight"])


@pytest.mark.parametrize("module", [CONV3, DOWNSAMPLER, SHORTCUT, PROJ_IN])
def test_conv_delta_by_hand(base_unet, lora_file, lora_tensors, module):
    """dW[o, i, :, :] = (alpha / rank) * sum_r B[o, r] A[r, i, :, :]"""
    unet, _ = fused(base_unet, lora_file)
    a = lora_tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"]
    b = lora_tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"]
    base_weight = dict(base_unet.named_modules())[module].weight
    expected = torch.zeros_like(base_weight)
    for r in range(RANK):
        expected += (ALPHA / RANK) * b[:, r, 0, 0][:, None, None, None] * a[r][None]
    delta = dict(unet.named_modules())[module].weight - base_weight
    assert delta.shape == base_weight.shape
    assert expected.abs().max().item() > 1e-3
    assert torch.allclose(delta, expected, atol=1e-6)


def test_linear_delta_by_hand(base_unet, lora_file, lora_tensors):
    unet, _ = fused(base_unet, lora_file)
    a = lora_tensors[f"{PEFT_PREFIX}{TO_Q}.lora_A.weight"]
    b = lora_tensors[f"{PEFT_PREFIX}{TO_Q}.lora_B.weight"]
    expected = sum((ALPHA / RANK) * torch.outer(b[:, r], a[r]) for r in range(RANK))
    delta = dict(unet.named_modules())[TO_Q].weight - dict(base_unet.named_modules())[TO_Q].weight
    assert torch.allclose(delta, expected, atol=1e-6)


def test_lora_delta_small_example():
    layer = LoraLayer(down=torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]]), up=torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    assert torch.equal(lora_delta(layer, default_alpha=1.0), torch.tensor([[0.5, 1.0, 1.5], [0.0, 1.0, 0.0]]))
    layer.alpha = 4.0  # an alpha from the file wins over the default
    assert torch.equal(lora_delta(layer, default_alpha=1.0), torch.tensor([[2.0, 4.0, 6.0], [0.0, 4.0, 0.0]]))


def convert(lora_tensors, style):
    out = {}
    for key, value in lora_tensors.items():
        module, side = key[len(PEFT_PREFIX):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        if style == "kohya":
            kohya = "lora_unet_" + module.replace(".", "_")
            out[f"{kohya}.lora_{'down' if side == 'lora_A' else 'up'}.weight"] = value
            out[f"{kohya}.alpha"] = torch.tensor(float(ALPHA))
        elif style == "diffusers":
            out[f"unet.{module}.{side}.weight"] = value
        elif style == "diffusers-old":
            out[f"unet.{module}.lora.{'down' if side == 'lora_A' else 'up'}.weight"] = value
        elif style == "peft-no-unet":
            out[f"base_model.model.{module}.{side}.weight"] = value
    return out


@pytest.mark.parametrize("style, default_alpha", [
    ("kohya", 1.0),  # alpha comes from the file's .alpha tensors, the default is ignored
    ("diffusers", ALPHA),
    ("diffusers-old", ALPHA),
    ("peft-no-unet", ALPHA),
])
def test_other_key_formats_fuse_identically(base_unet, lora_file, lora_tensors, tmp_path, style, default_alpha):
    reference, count = fused(base_unet, lora_file)
    path = tmp_path / f"{style}.safetensors"
    save_file(convert(lora_tensors, style), str(path))
    other, other_count = fused(base_unet, path, default_alpha=default_alpha)
    assert other_count == count
    ref_state, other_state = reference.state_dict(), other.state_dict()
    assert all(torch.equal(ref_state[name], other_state[name]) for name in ref_state)


def test_kohya_alpha_sets_the_scale(base_unet, lora_tensors, tmp_path):
    tensors = convert(lora_tensors, "kohya")
    tensors = {k: (torch.tensor(2.0) if k.endswith(".alpha") else v) for k, v in tensors.items()}
    path = tmp_path / "kohya-alpha2.safetensors"
    save_file(tensors, str(path))
    unet, _ = fused(base_unet, path, default_alpha=ALPHA)
    a = lora_tensors[f"{PEFT_PREFIX}{TO_Q}.lora_A.weight"]
    b = lora_tensors[f"{PEFT_PREFIX}{TO_Q}.lora_B.weight"]
    delta = dict(unet.named_modules())[TO_Q].weight - dict(base_unet.named_modules())[TO_Q].weight
    assert torch.allclose(delta, (2.0 / RANK) * b @ a, atol=1e-6)


def test_read_lora_groups_by_module(base_unet, lora_file):
    layers = read_lora(lora_file, {name for name, _ in base_unet.named_modules()})
    assert len(layers) == 128
    assert layers[TO_Q].alpha is None
    assert layers[CONV3].down.shape == (RANK, 32, 3, 3) and layers[CONV3].up.shape == (32, RANK, 1, 1)


# --- errors --------------------------------------------------------------------------------------------

def write(tmp_path, name, tensors):
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def expect_model_error(unet, path, *fragments):
    with pytest.raises(ModelError) as info:
        fuse_lora(unet, path, default_alpha=ALPHA)
    message = str(info.value)
    assert "\n" not in message
    assert path.name in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_error_unknown_module(base_unet, lora_tensors, tmp_path):
    tensors = dict(lora_tensors)
    tensors[f"{PEFT_PREFIX}down_blocks.0.nothing_here.lora_A.weight"] = torch.zeros(RANK, 32)
    tensors[f"{PEFT_PREFIX}down_blocks.0.nothing_here.lora_B.weight"] = torch.zeros(32, RANK)
    unet = copy.deepcopy(base_unet)
    expect_model_error(unet, write(tmp_path, "unknown.safetensors", tensors), "unknown UNet module", "nothing_here")


def test_error_unknown_kohya_module(base_unet, tmp_path):
    tensors = {"lora_unet_down_blocks_0_nothing.lora_down.weight": torch.zeros(RANK, 32),
               "lora_unet_down_blocks_0_nothing.lora_up.weight": torch.zeros(32, RANK)}
    expect_model_error(copy.deepcopy(base_unet), write(tmp_path, "kohya-unknown.safetensors", tensors), "unknown UNet module")


def test_error_missing_b(base_unet, lora_tensors, tmp_path):
    tensors = {k: v for k, v in lora_tensors.items() if k != f"{PEFT_PREFIX}{TO_Q}.lora_B.weight"}
    expect_model_error(copy.deepcopy(base_unet), write(tmp_path, "no-b.safetensors", tensors), TO_Q, "B/up")


def test_error_missing_a(base_unet, lora_tensors, tmp_path):
    tensors = {k: v for k, v in lora_tensors.items() if k != f"{PEFT_PREFIX}{CONV3}.lora_A.weight"}
    expect_model_error(copy.deepcopy(base_unet), write(tmp_path, "no-a.safetensors", tensors), CONV3, "A/down")


def test_error_shape_mismatch(base_unet, lora_tensors, tmp_path):
    tensors = dict(lora_tensors)
    tensors[f"{PEFT_PREFIX}{TO_Q}.lora_A.weight"] = torch.zeros(RANK, 33)  # the layer takes 32 inputs
    unet = copy.deepcopy(base_unet)
    expect_model_error(unet, write(tmp_path, "shape.safetensors", tensors), TO_Q,
                       f"A is ({RANK}, 33) but the Linear takes in=32: A should be ({RANK}, 32)")


def test_error_conv_kernel_mismatch(base_unet, lora_tensors, tmp_path):
    tensors = dict(lora_tensors)
    tensors[f"{PEFT_PREFIX}{CONV3}.lora_A.weight"] = torch.zeros(RANK, 32, 1, 1)  # the layer is 3x3
    expect_model_error(copy.deepcopy(base_unet), write(tmp_path, "kernel.safetensors", tensors), CONV3,
                       "takes in=32 with a 3x3 kernel")


def test_error_rank_mismatch_between_a_and_b(base_unet, lora_tensors, tmp_path):
    tensors = dict(lora_tensors)
    tensors[f"{PEFT_PREFIX}{TO_Q}.lora_B.weight"] = torch.zeros(32, RANK - 1)
    expect_model_error(copy.deepcopy(base_unet), write(tmp_path, "rank.safetensors", tensors), TO_Q)


def test_error_not_a_linear_or_conv(base_unet, tmp_path):
    tensors = {f"{PEFT_PREFIX}down_blocks.0.resnets.0.norm1.lora_A.weight": torch.zeros(RANK, 32),
               f"{PEFT_PREFIX}down_blocks.0.resnets.0.norm1.lora_B.weight": torch.zeros(32, RANK)}
    expect_model_error(copy.deepcopy(base_unet), write(tmp_path, "norm.safetensors", tensors), "GroupNorm")


def test_error_unrecognised_key(base_unet, lora_tensors, tmp_path):
    tensors = dict(lora_tensors)
    tensors["text_encoder.something.weight"] = torch.zeros(2)
    expect_model_error(copy.deepcopy(base_unet), write(tmp_path, "odd.safetensors", tensors), "unrecognised LoRA key",
                       "text_encoder.something.weight")


def test_error_no_lora_weights(base_unet, tmp_path):
    path = write(tmp_path, "empty.safetensors", {"lora_unet_conv_in.alpha": torch.tensor(8.0)})
    expect_model_error(copy.deepcopy(base_unet), path, "holds no LoRA weights")


def test_error_not_safetensors(base_unet, lora_tensors, tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("this is not a safetensors file\n" * 5)
    expect_model_error(copy.deepcopy(base_unet), text, "not a readable safetensors LoRA file")
    pickled = tmp_path / "lora.pt"
    torch.save(dict(list(lora_tensors.items())[:2]), pickled)
    expect_model_error(copy.deepcopy(base_unet), pickled, "not a readable safetensors LoRA file")


def test_failed_file_leaves_weights_untouched_when_read_fails(base_unet, lora_tensors, tmp_path):
    """Reading (keys, missing halves) is checked before any layer is changed."""
    tensors = {k: v for k, v in lora_tensors.items() if k != f"{PEFT_PREFIX}{TO_Q}.lora_B.weight"}
    unet = copy.deepcopy(base_unet)
    with pytest.raises(ModelError):
        fuse_lora(unet, write(tmp_path, "partial.safetensors", tensors), default_alpha=ALPHA)
    before, after = base_unet.state_dict(), unet.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
