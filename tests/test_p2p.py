"""Prompt-to-Prompt: token maps, windows, the attention processors and LocalBlend on a tiny UNet."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from icd.core.denoiser import Conditioning, Guided
from icd.models.loading import unet_eps
from icd.models.offline import character_tokenizer
from icd.editing import P2PConfig
from icd.p2p import AttentionHost, P2PProcessor, PromptToPrompt, SteeredUNet, Steering, step_windows, steered_eps
from icd.p2p.tokens import refinement_mapper, replacement_mapper, word_token_indices

LATENT = (16, 12)  # not square: levels 16x12 (192 tokens), 8x6 (48), 4x3 (12, the mid block)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return character_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def tiny_unet(mid_block_type="UNetMidBlock2DCrossAttn"):
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), mid_block_type=mid_block_type,
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
    ).eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def encode(tokenizer, *prompts):
    """A stand-in text encoder: a fixed random embedding per token id and position."""
    table = torch.randn(len(tokenizer), 32, generator=torch.Generator().manual_seed(1))
    ids = tokenizer(list(prompts), padding="max_length", max_length=77, return_tensors="pt").input_ids
    return table[ids] + torch.linspace(-1, 1, 77)[:, None]


def latents(identical_rows):
    x = torch.randn(2, 4, *LATENT, generator=torch.Generator().manual_seed(2))
    return x[:1].expand(2, -1, -1, -1).clone() if identical_rows else x


def host_of(unet):
    """The steered eager UNet and its denoiser, as a torch session hands them to Prompt-to-Prompt (no
    guidance embedding; the tests run w = 0, so the unconditional rows are never used)."""
    return AttentionHost(steered_eps(SteeredUNet(unet)), torch.device("cpu"),
                         lambda eps: Guided(eps, None, Conditioning(torch.zeros(1, 77, 32))))


@torch.no_grad()
def run(unet, x, cond, controller=None, steps=(999, 519)):
    """The denoiser calls of our decoding loop (w = 0: one pass; the jump is left out, x stays the same).
    Without a controller: a fresh UNet of the same weights with diffusers' own processors."""
    cond, w = Conditioning(cond), torch.zeros(x.shape[0])
    if controller is None:
        plain = unet_eps(tiny_unet(unet.config.mid_block_type))
        return [plain(x, t, cond, None) for t in steps]
    host, outputs = host_of(unet), []
    with host.attached(controller):
        for i, t in enumerate(steps):
            outputs.append(host.denoiser(x, t, cond, w))
            controller.after_step(i, x)
    return outputs


def test_word_token_indices_multi_token_and_repeated(tokenizer):
    prompt = "a red cat and a red dog"
    ids = tokenizer(prompt).input_ids
    assert word_token_indices(tokenizer, prompt, "red") == [2, 3, 4, 12, 13, 14]
    assert tokenizer.convert_ids_to_tokens([ids[i] for i in (12, 13, 14)]) == ["r", "e", "d</w>"]
    assert word_token_indices(tokenizer, prompt, "A") == [1, 11]
    assert word_token_indices(tokenizer, prompt, "dog") == [15, 16, 17]
    assert word_token_indices(tokenizer, prompt, "re") == []
    assert word_token_indices(tokenizer, "a red cats", "red") == [2, 3, 4]  # whole words only
    assert word_token_indices(tokenizer, "a red cats", "cat") == []
    # case and surrounding punctuation are ignored (a comma silently disabled blends officially)
    assert word_token_indices(tokenizer, "A Red, cat", "red") == word_token_indices(tokenizer, "a red, cat", "RED") == [2, 3, 4]


def test_replacement_mapper_spreads_words_of_different_token_lengths(tokenizer):
    # a red cat -> [<s>, a, r, e, d, c, a, t, </s>]; a blue cat -> [<s>, a, b, l, u, e, c, a, t, </s>]
    weights = replacement_mapper(tokenizer, "a red cat", "a blue cat")
    expected = torch.zeros(77, 77)
    for s, t in [(0, 0), (1, 1), (5, 6), (6, 7), (7, 8)]:
        expected[s, t] = 1.0
    expected[2, 2], expected[2, 3] = 0.75, 0.25  # r -> b, l
    expected[3, 3], expected[3, 4] = 0.5, 0.5  # e -> l, u
    expected[4, 4], expected[4, 5] = 0.25, 0.75  # d -> u, e
    for t in range(9, 77):  # end token and padding, one place later
        expected[t - 1, t] = 1.0
    assert torch.equal(weights, expected)
    assert torch.equal(weights[1:8].sum(1), torch.ones(7))  # every source word token's mass is kept


def test_refinement_mapper_aligns_tokens(tokenizer):
    mapping = refinement_mapper(tokenizer, "a cat", "a fat cat")
    # target [<s>, a, f, a, t, c, a, t, </s>, pad...]; source [<s>, a, c, a, t, </s>, pad...]
    assert mapping[:10] == [0, 1, None, None, None, 2, 3, 4, 5, 6]
    assert mapping[-1] == 76 - 3 and len(mapping) == 77


@pytest.mark.parametrize(
    "num_steps, cross, self_, cross_steps, self_steps, warned",
    [
        (4, 0.3, 0.6, range(1), range(2), []),
        (4, 0.8, 0.2, range(4), range(0), ["self_replace 0.2 controls no step of 4 (at least 0.25 is needed)"]),
        (4, 1.0, 1.0, range(4), range(4), []),
        (3, 0.3, 0.6, range(1), range(1), []),
        (3, 0.8, 0.2, range(3), range(0), ["self_replace 0.2 controls no step of 3 (at least 0.34 is needed)"]),
        (4, 0.1, 0.0, range(0), range(0), ["cross_replace 0.1 controls no step of 4 (at least 0.2 is needed)"]),
    ],
)
def test_windows(tokenizer, num_steps, cross, self_, cross_steps, self_steps, warned):
    assert step_windows(num_steps, cross, self_) == (cross_steps, self_steps)
    config = P2PConfig(cross_replace=cross, self_replace=self_)
    controller = PromptToPrompt(tokenizer, "a cat", "a dog", num_steps, config, latent_size=LATENT)
    assert (controller.cross_steps, controller.self_steps) == (cross_steps, self_steps)
    assert controller.warnings == warned


def test_default_amplify_and_word_warnings(tokenizer):
    controller = PromptToPrompt(tokenizer, "a cat", "a fat cat on the mat", 4, latent_size=LATENT)
    assert controller.amplify == {"fat": 4.0, "mat": 4.0}
    config = P2PConfig(amplify={"dog": 2.0}, blend=(("cat",), ("cow",)))
    controller = PromptToPrompt(tokenizer, "a cat", "a fat cat", 4, config, latent_size=LATENT)
    assert controller.warnings == [
        "amplified word 'dog' is not a word of 'a fat cat'",
        "blend word 'cow' is not a word of 'a fat cat'",
    ]


@pytest.mark.parametrize(
    "source, target, config, identical_rows",
    [
        ("a red cat", "a red cat", P2PConfig(cross_replace=1.0, self_replace=1.0), True),
        ("a red cat", "a blue dog", P2PConfig(cross_replace=0.0, self_replace=0.0), False),
    ],
    ids=["same-prompt", "empty-windows"],
)
def test_processors_match_unhooked_unet(tokenizer, unet, source, target, config, identical_rows):
    x, cond = latents(identical_rows), encode(tokenizer, source, target)
    controller = PromptToPrompt(tokenizer, source, target, 2, config, latent_size=LATENT)
    for hooked, plain in zip(run(unet, x, cond, controller), run(unet, x, cond), strict=True):
        torch.testing.assert_close(hooked, plain, rtol=0, atol=1e-5)


def test_self_attention_replacement(tokenizer, unet, monkeypatch):
    x, cond = latents(identical_rows=True), encode(tokenizer, "a red cat", "a blue dog")
    config = P2PConfig(cross_replace=0.0, self_replace=1.0)
    controller = PromptToPrompt(tokenizer, "a red cat", "a blue dog", 2, config, latent_size=LATENT)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append((q, k))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    hooked = run(unet, x, cond, controller)
    monkeypatch.undo()

    replaced = [(q, k) for q, k in calls if q.shape[2] == k.shape[2] and q.shape[2] <= 16 * 12 / 4]
    assert sorted({q.shape[2] for q, _ in replaced}) == [12, 48]  # 8x6 and 4x3 layers, not 16x12
    for q, k in replaced:
        probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        assert torch.equal(probs[1], probs[0])
    plain = run(unet, x, cond)
    for h, p in zip(hooked, plain, strict=True):
        assert (h[1] - h[0]).abs().mean() < (p[1] - p[0]).abs().mean()


def test_reweight_scales_exactly_the_amplified_columns(tokenizer, unet, monkeypatch):
    x, cond = latents(identical_rows=False), encode(tokenizer, "a red cat", "a blue cat")
    config = P2PConfig(cross_replace=1.0, self_replace=0.0, amplify={"blue": 3.0})
    controller = PromptToPrompt(tokenizer, "a red cat", "a blue cat", 2, config, latent_size=LATENT)
    calls, cross_attention = [], Steering.cross_attention

    def spy(steering, q, k, v, scale, mask, records):
        calls.append((steering, q, k, scale))
        return cross_attention(steering, q, k, v, scale, mask, records)

    monkeypatch.setattr(Steering, "cross_attention", spy)
    run(unet, x, cond, controller)
    monkeypatch.undo()
    assert len(calls) == 2 * 7  # every cross-attention layer on both steps

    # The edited attention probabilities themselves: with v the identity, attention returns them.
    steering, q, k, scale = calls[0]
    eye = torch.eye(77).expand(*q.shape[:2], 77, 77)
    edited = steering.cross_attention(q, k, eye, scale, None, records=False)
    probs = (q @ k.transpose(-1, -2) * scale).softmax(-1)
    mapped = probs[0] @ replacement_mapper(tokenizer, "a red cat", "a blue cat")
    blue = [2, 3, 4, 5]
    others = [i for i in range(77) if i not in blue]
    assert torch.equal(edited[0], probs[0] @ torch.eye(77))
    torch.testing.assert_close(edited[1][..., blue], 3.0 * mapped[..., blue], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(edited[1][..., others], mapped[..., others], rtol=1e-6, atol=1e-7)
    steering.cross = torch.tensor([False])  # outside the window: the target's own maps
    torch.testing.assert_close(steering.cross_attention(q, k, eye, scale, None, records=False), probs,
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mid_block_type", ["UNetMidBlock2DCrossAttn", None], ids=["quarter-layers", "coarsest"])
@pytest.mark.parametrize("threshold", [0.0, 0.95, 1.0])
def test_local_blend(tokenizer, mid_block_type, threshold):
    unet = tiny_unet(mid_block_type)
    x, cond = latents(identical_rows=True), encode(tokenizer, "a cat", "a dog")
    config = P2PConfig(blend=(("cat",), ("dog",)), blend_threshold=threshold)
    controller = PromptToPrompt(tokenizer, "a cat", "a dog", 4, config, latent_size=LATENT)
    jumped = torch.randn(2, 4, *LATENT, generator=torch.Generator().manual_seed(3))
    host = host_of(unet)
    with torch.no_grad(), host.attached(controller):
        host.denoiser(x, 999, Conditioning(cond), torch.zeros(2))
        blended = controller.after_step(0, jumped)

    assert controller.blend_tokens == (12 if mid_block_type else 48)  # 4x3 = latent/4, else 8x6
    assert torch.equal(blended[0], jumped[0])
    kept = (blended[1] == jumped[1]).all(0)  # inside the mask: the target, unchanged
    reset = (blended[1] == jumped[0]).all(0)  # outside: exactly the source
    assert torch.equal(kept, ~reset)
    coverage = kept.float().mean().item()
    assert {0.0: coverage == 1.0, 0.95: 0.0 < coverage < 1.0, 1.0: coverage == 0.0}[threshold]


def test_processors_set_once_and_steered_only_inside_an_edit(tokenizer):
    unet = tiny_unet()
    host = host_of(unet)
    processors = unet.attn_processors
    assert all(isinstance(p, P2PProcessor) for p in processors.values())
    SteeredUNet(unet)  # a second steered module over the same UNet keeps its processors
    assert all(p is processors[name] for name, p in unet.attn_processors.items())
    levels = {name: p.level for name, p in processors.items()}
    assert levels["down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"] == 1
    assert levels["mid_block.attentions.0.transformer_blocks.0.attn1.processor"] == 2
    assert levels["up_blocks.2.attentions.0.transformer_blocks.0.attn2.processor"] == 0
    assert {name for name, p in processors.items() if p.records} == {
        "mid_block.attentions.0.transformer_blocks.0.attn1.processor",
        "mid_block.attentions.0.transformer_blocks.0.attn2.processor"}  # latent/4: the mid block

    controller = PromptToPrompt(tokenizer, "a cat", "a dog", 4, latent_size=LATENT)
    x, cond = latents(identical_rows=True), Conditioning(encode(tokenizer, "a cat", "a dog"))
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), host.attached(controller):
        host.denoiser(x, 999, cond, torch.zeros(2))
        raise RuntimeError("boom")
    with pytest.raises(ValueError, match="called outside a prompt-to-prompt edit"), torch.no_grad():
        host.denoiser(x, 999, cond, torch.zeros(2))
    with pytest.raises(ValueError, match="rows in \\(source, target\\) pairs, got a batch of 3"), \
            torch.no_grad(), host.attached(controller):
        host.denoiser(torch.cat([x, x[:1]]), 999, Conditioning(cond.embeds[[0, 1, 1]]), torch.zeros(3))


def test_controllers_built_once_per_prompt_pair(tokenizer, unet, monkeypatch):
    built = []
    real_init = PromptToPrompt.__init__
    monkeypatch.setattr(PromptToPrompt, "__init__", lambda self, *a, **k: built.append(a[1:3]) or real_init(self, *a, **k))
    host = host_of(unet)
    config = P2PConfig(amplify={"dog": 2.0})
    first = host.controller(tokenizer, "a cat", "a dog", 4, config, latent_size=LATENT)
    again = host.controller(tokenizer, "a cat", "a dog", 4, P2PConfig(amplify={"dog": 2.0}), latent_size=LATENT)
    other = host.controller(tokenizer, "a cat", "a cow", 4, config, latent_size=LATENT)
    assert first is again and other is not first
    assert built == [("a cat", "a dog"), ("a cat", "a cow")]
    assert host.controller(tokenizer, "a cat", "a dog", 3, config, latent_size=LATENT) is not first
