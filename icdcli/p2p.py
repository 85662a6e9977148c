"""Prompt-to-Prompt attention control for two-row iCD decoding.

Every UNet call sees row 0 = source prompt (the faithful reconstruction) and row 1 = target prompt
(the edit); row 1's attention is steered by row 0's:

- cross-attention: the source maps are carried over to the target's tokens (Replace when the prompts
  have as many words, Refine from a token alignment otherwise), then amplified words are reweighted;
- self-attention: the target uses the source's maps, in layers of at most latent/2 x latent/2 tokens;
- LocalBlend: outside the region of the blend words (`--mask-words`) the target latent is reset to the
  source. As in the official code, the region comes from the maps after the edit (the official attention
  store keeps references that the replacement and the reweighting then overwrite in place): the source row's
  own maps and the target row's edited ones.

Windows keep the official quantisation so the paper's launch settings mean what they meant: with K
steps, cross-attention is replaced on steps [0, int(c*(K+1))) and self-attention on [0, int(s*K)).

Everything an edit needs is a handful of tensors fixed when its controller is built (once per prompt pair,
steps and latent size, then cached by the host): the token map and which target tokens keep their own maps,
the reweights, the blend-word columns, and per step a cross-attention flag and a self-attention flag per
UNet resolution level. The attention processors are set once on the reverse UNet and hold no state: a call
with a `Steering` in its cross-attention kwargs is edited as its tensors say, a call without one is plain
attention. So one graph serves every step and prompt pair: torch.compile compiles it once per shape, and the
ONNX export takes the control as graph inputs (`CONTROL_NAMES`) and returns the blend maps as an output.

LocalBlend on small latents: the blend level is the UNet's latent/4 level (16x16 at 512 px) or, without one,
the coarsest level with cross-attention. On `mini` (8x8 latents) that is a 4x4 grid, 16 pixels a cell, where
the official 3x3 dilation alone selects nearly everything, so grids under `DILATED_GRID` cells a side are not
dilated. mini's colour words still select the whole image: their attention is nearly flat (the weakest cell
holds 0.27-0.4 of the strongest, over the threshold 0.3). A map that selects nothing or everything is told
with the result (`blend_notes`), so a blend that cannot act never passes unnoticed.
"""

from __future__ import annotations

import copy
import math
import string
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .core.denoiser import Denoiser
from .editing import MASK_WORDS_NOTE, P2PConfig
from .errors import ICDError

DEFAULT_AMPLIFY = 4.0
LEVELS = 6  # self-attention flags per step, one per UNet resolution level (SD1.5 has 4, SDXL 3)
CONTROL_NAMES = ("p2p_cross", "p2p_self", "p2p_weights", "p2p_keep", "p2p_equalizer", "p2p_blend")
CACHED_CONTROLLERS = 16
DILATED_GRID = 8  # LocalBlend widens its map by one cell (3x3 max-pool) only on grids at least this fine
STOPWORDS = frozenset(
    "a an the and or but of in on at to with without for from by as is are was were be been this that these "
    "those it its his her their my your our into onto over under near".split()
)


def _word_spans(tokenizer, prompt: str) -> list[tuple[str, range]]:
    """Each space-split word, bare, with the positions of its own tokens (not its punctuation's)."""
    count = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids) if text else 0  # noqa: E731
    spans, start = [], 1
    for word in prompt.split():
        core = bare_word(word)
        lead = count(word[: len(word) - len(word.lstrip(string.punctuation))])
        spans.append((core, range(start + lead, start + lead + count(core))))
        start += count(word)
    return spans


def bare_word(word: str) -> str:
    """A prompt word without case or surrounding punctuation: "Cat," matches "cat" (the official code
    compared raw words, so a comma silently disabled blends and reweights)."""
    return word.lower().strip(string.punctuation)


def prompt_words(prompt: str) -> list[str]:
    return [bare_word(w) for w in prompt.split()]


def word_token_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of all tokens of every occurrence of the whole word (case and punctuation ignored)."""
    last = tokenizer.model_max_length - 1  # the end token's place when the prompt is truncated
    wanted = bare_word(word)
    return [p for w, span in _word_spans(tokenizer, prompt) if w == wanted for p in span if p < last]


def replacement_mapper(tokenizer, source: str, target: str) -> torch.Tensor:
    """(L, L) weights W, target cross-attention = source cross-attention @ W, for equal word counts.

    A source word's attention mass is spread over the target word's tokens in proportion to how their
    relative places inside the word overlap, so words of different token lengths still line up.
    """
    length = tokenizer.model_max_length
    weights = torch.zeros(length, length)
    weights[0, 0] = 1.0
    source_spans, target_spans = _word_spans(tokenizer, source), _word_spans(tokenizer, target)
    for (_, src), (_, tgt) in zip(source_spans, target_spans, strict=True):
        for k, s in enumerate(src):
            for j, t in enumerate(tgt):
                overlap = min((k + 1) * len(tgt), (j + 1) * len(src)) - max(k * len(tgt), j * len(src))
                if overlap > 0 and max(s, t) < length - 1:
                    weights[s, t] = overlap / len(tgt)
    # The end token and the padding follow on from the last word.
    source_end = min(source_spans[-1][1].stop if source_spans else 1, length - 1)
    target_end = min(target_spans[-1][1].stop if target_spans else 1, length - 1)
    for t in range(target_end, length):
        weights[min(t - target_end + source_end, length - 1), t] = 1.0
    return weights


def refinement_mapper(tokenizer, source: str, target: str) -> list[int | None]:
    """For each target token position, its globally aligned source position, or None for a new token.

    Needleman-Wunsch on the token ids (match +1, mismatch -1, gap 0); the padding after the end token
    follows the source's padding.
    """
    length = tokenizer.model_max_length
    a = tokenizer(source, truncation=True).input_ids
    b = tokenizer(target, truncation=True).input_ids
    score = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            diagonal = score[i - 1][j - 1] + (1 if a[i - 1] == b[j - 1] else -1)
            score[i][j] = max(score[i - 1][j], score[i][j - 1], diagonal)
    mapping: list[int | None] = [None] * len(b)
    i, j = len(a), len(b)
    while i and j:
        if a[i - 1] == b[j - 1] and score[i][j] == score[i - 1][j - 1] + 1:
            i, j = i - 1, j - 1
            mapping[j] = i
        elif score[i][j] == score[i][j - 1]:
            j -= 1
        else:
            i -= 1
    return mapping + [min(t - len(b) + len(a), length - 1) for t in range(len(b), length)]


def step_windows(num_steps: int, cross_replace: float, self_replace: float) -> tuple[range, range]:
    """Steps (0-based) whose cross- and self-attention are replaced, quantised as the official code."""
    cross = min(int(cross_replace * (num_steps + 1)), num_steps)
    return range(cross), range(min(int(self_replace * num_steps), num_steps))


def _window_warnings(num_steps: int, cross_replace: float, self_replace: float) -> list[str]:
    """Fractions > 0 that the quantisation turns into no step at all (official bug #20)."""
    cross, self_ = step_windows(num_steps, cross_replace, self_replace)
    found = []
    for name, fraction, steps, slots in (
        ("cross_replace", cross_replace, cross, num_steps + 1),
        ("self_replace", self_replace, self_, num_steps),
    ):
        if fraction > 0 and not steps:
            needed = math.ceil(100 / slots) / 100
            found.append(f"{name} {fraction:g} controls no step of {num_steps} (at least {needed:g} is needed)")
    return found


def level_grid(latent_size: tuple[int, int], level: int) -> tuple[int, int]:
    """The (h, w) of UNet resolution level `level` (0: the latent; each level halves, rounding up)."""
    h, w = latent_size
    for _ in range(level):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def attention_level(module_name: str, levels: int) -> int:
    """The resolution level of an attention module, from its name in a diffusers UNet with `levels` levels."""
    block, _, rest = module_name.partition(".")
    if block == "mid_block":
        return levels - 1
    index = int(rest.split(".", 1)[0])
    return index if block == "down_blocks" else levels - 1 - index


def blend_level(config) -> int:
    """The level whose cross-attention LocalBlend reads: latent/4 (16x16 at 512 px) where it has
    cross-attention, else the coarsest level that has some."""
    levels = len(config["block_out_channels"])
    found = {i for i, kind in enumerate(config["down_block_types"]) if "CrossAttn" in kind}
    found |= {levels - 1 - j for j, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind}
    if config.get("mid_block_type") and "CrossAttn" in config["mid_block_type"]:
        found.add(levels - 1)
    if not found:
        raise ValueError("prompt-to-prompt needs a UNet with cross-attention")
    return 2 if 2 in found else max(found)


class PromptToPrompt:
    """The controller of one edit: the control tensors (built here, once), the step under way, LocalBlend."""

    def __init__(self, tokenizer, source: str, target: str, num_steps: int, config: P2PConfig | None = None,
                 *, latent_size: tuple[int, int]):
        config = config or P2PConfig()
        for name in ("cross_replace", "self_replace"):
            if not 0.0 <= getattr(config, name) <= 1.0:
                raise ICDError(f"{name} must be between 0 and 1, got {getattr(config, name)}")
        self.cross_steps, self.self_steps = step_windows(num_steps, config.cross_replace, config.self_replace)
        self.warnings = _window_warnings(num_steps, config.cross_replace, config.self_replace)
        self.latent_size = tuple(latent_size)
        length = tokenizer.model_max_length

        if len(source.split()) == len(target.split()):
            weights = replacement_mapper(tokenizer, source, target)
            keep = torch.zeros(length, dtype=torch.bool)
        else:
            mapping = refinement_mapper(tokenizer, source, target)
            weights = torch.zeros(length, length)
            for t, s in enumerate(mapping):
                if s is not None:
                    weights[s, t] = 1.0
            keep = torch.tensor([s is None for s in mapping])  # new tokens keep the target's maps

        source_words = set(prompt_words(source))
        self.amplify = dict(config.amplify) if config.amplify is not None else {
            w: DEFAULT_AMPLIFY for w in dict.fromkeys(prompt_words(target))
            if w and w not in source_words and w not in STOPWORDS
        }
        equalizer = torch.ones(length)
        for word, factor in self.amplify.items():
            equalizer[self._positions(tokenizer, target, word, "amplified")] = factor

        self.blends = config.blend is not None
        self._blend_words = config.blend
        blend_columns = torch.zeros(2, length)
        if self.blends:
            for row, (prompt, words) in enumerate(zip((source, target), config.blend, strict=True)):
                for word in words:
                    blend_columns[row, self._positions(tokenizer, prompt, word, "blend")] = 1.0
        self._threshold = config.blend_threshold

        # Self-attention is replaced in layers of at most latent/2 x latent/2 tokens, on the window's steps.
        most = self.latent_size[0] * self.latent_size[1] / 4
        small = torch.tensor([math.prod(level_grid(self.latent_size, level)) <= most for level in range(LEVELS)])
        cross = torch.tensor([step in self.cross_steps for step in range(num_steps)])
        self_gates = torch.tensor([step in self.self_steps for step in range(num_steps)])[:, None] & small
        self._tensors = (cross, self_gates, weights, keep, equalizer, blend_columns)
        self._on_device: dict[torch.device, tuple[list, tuple]] = {}
        self._steps: list = []
        self._fixed: tuple = ()
        self._reset()

    def _positions(self, tokenizer, prompt: str, word: str, role: str) -> list[int]:
        positions = word_token_indices(tokenizer, prompt, word)
        if not positions:
            self.warnings.append(f"{role} word {word!r} is not a word of {prompt!r}")
        return positions

    def _reset(self) -> None:
        self.step = 0
        self._maps: torch.Tensor | None = None  # (2, tokens) blend-word attention at the blend level, summed
        self._coverage: list[torch.Tensor] = []  # each step's share of the latent the blend kept, on the device
        self.blend_mask: torch.Tensor | None = None  # (1, 1, h, w): the last step's blend region, 0 or 1

    def device_tensors(self, device: torch.device) -> tuple[tuple, tuple]:
        """The control on `device`, copied there once: one tuple per step and the tensors every step shares."""
        device = torch.device(device)
        if device not in self._on_device:
            cross, self_gates, *fixed = (t.to(device) for t in self._tensors)
            # One tensor per step (not views of one): torch.compile then sees the same inputs every step.
            steps = tuple((cross[i:i + 1].clone(), self_gates[i].clone()) for i in range(len(cross)))
            self._on_device[device] = steps, tuple(fixed)
        return self._on_device[device]

    def bound(self, control: tuple[tuple, tuple], device: torch.device) -> PromptToPrompt:
        """This edit steered by `control` (the buffers of a captured loop): a copy that shares every host
        setting and keeps its own step and blend state."""
        view = copy.copy(self)
        view._on_device = {torch.device(device): control}
        return view

    @property
    def graph_key(self) -> tuple:
        """The host settings a decoding reads besides the control tensors and the latent's size (a captured
        loop's key): whether LocalBlend runs, and its threshold."""
        return self.blends, self._threshold

    def start(self, device: torch.device) -> None:
        """Ready for a new decoding on `device`."""
        self._steps, self._fixed = self.device_tensors(device)
        self._reset()

    def control(self) -> tuple[torch.Tensor, ...]:
        """The control tensors of the step under way, in `CONTROL_NAMES` order."""
        return (*self._steps[self.step], *self._fixed)

    def observe(self, maps: torch.Tensor) -> None:
        """Adds the blend maps a UNet call of this step returned (every call counts, as officially)."""
        if self.blends:
            self._maps = maps if self._maps is None else self._maps + maps

    @property
    def blend_tokens(self) -> int | None:
        """The token count of the layers LocalBlend reads, known after the first call."""
        return None if self._maps is None else self._maps.shape[-1]

    def after_step(self, step: int, x: torch.Tensor) -> torch.Tensor:
        """LocalBlend on the jumped latents (2 rows), then moves on to the next step."""
        if step != self.step:
            raise ValueError(f"after_step({step}) called while the controller is at step {self.step}")
        if self.blends:
            x = self._blend(x)
        self.step += 1
        return x

    def _grid(self, tokens: int) -> tuple[int, int]:
        """The (h, w) of a UNet level with `tokens` positions."""
        h, w = self.latent_size
        while h * w > tokens:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if h * w != tokens:
            raise ValueError(f"no UNet level of latent {self.latent_size} has {tokens} positions")
        return h, w

    def _blend(self, x: torch.Tensor) -> torch.Tensor:
        """Keeps the target only where the source or target blend words are attended (LocalBlend)."""
        # Summed over layers rather than averaged: the max normalisation below removes the factor.
        grid = self._grid(self.blend_tokens)
        maps = self._maps.view(2, 1, *grid)
        if min(grid) >= DILATED_GRID:
            maps = F.max_pool2d(maps, 3, stride=1, padding=1)
        maps = F.interpolate(maps, size=x.shape[-2:], mode="nearest")
        maps = maps / maps.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
        mask = (maps > self._threshold).any(0)  # source-row mask OR target-row mask
        self.blend_mask = mask[None].float()
        self._coverage.append(self.blend_mask.mean())
        return torch.stack([x[0], torch.where(mask, x[1], x[0])])

    def outcome(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """After a decoding with blend words: the last step's region (1, 1, h, w), each step's share of the
        latent it kept, and the summed blend-word maps (their shape gives the grid); None without them."""
        if not self._coverage:
            return None
        return self.blend_mask, torch.stack(self._coverage), self._maps

    def blend_notes(self, outcome: tuple | None) -> list[str]:
        """What to tell when the blend map of a decoding's `outcome` selected nothing (the last step) or the
        whole latent (every step), so a blend that did not act never goes unnoticed. Reads the device once."""
        if outcome is None:
            return []
        _, coverage, maps = outcome
        coverage = coverage.tolist()
        words = f"{MASK_WORDS_NOTE} " + " ".join(self._blend_words[0]) + ":" + " ".join(self._blend_words[1])
        cells = "x".join(str(n) for n in self._grid(maps.shape[-1]))
        if coverage[-1] == 0.0:
            return [f"{words} selects nothing (the words' attention on a {cells} grid stays under "
                    f"the threshold {self._threshold:g}): the result is the reconstruction"]
        if min(coverage) == 1.0:
            return [f"{words} selects the whole image at every step (the words' attention on a "
                    f"{cells} grid is above {self._threshold:g} everywhere): the edit is not confined; "
                    "--mask FILE confines it"]
        return []


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """(2P, ...) -> (P, 2, ...): rows go in (source, target) pairs; two-pass guidance batches two pairs."""
    if x.shape[0] % 2:
        raise ValueError(f"prompt-to-prompt needs rows in (source, target) pairs, got a batch of {x.shape[0]}")
    return x.unflatten(0, (-1, 2))


class Steering:
    """One steered UNet call's control tensors (see `CONTROL_NAMES`), handed to every attention processor
    through the UNet's cross-attention kwargs; the blend level's layers add their blend-word attention to
    `maps`. Every branch is a tensor select, so the call is one graph whatever the step or the prompts."""

    def __init__(self, cross: torch.Tensor, self_gates: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor,
                 equalizer: torch.Tensor, blend_columns: torch.Tensor):
        self.cross, self.self_gates = cross, self_gates
        self.weights, self.keep, self.equalizer, self.blend_columns = weights, keep, equalizer, blend_columns
        self.maps: list[torch.Tensor] = []

    def cross_attention(self, q, k, v, scale: float, mask, records: bool) -> torch.Tensor:
        """Row 1's cross-attention from row 0's mapped to the target tokens and reweighted, where the step
        says so; the maps on the blend words are kept when `records`: after the edit, as officially."""
        scores = q.float() @ k.float().transpose(-1, -2) * scale
        probs = _pairs((scores if mask is None else scores + mask).softmax(-1))  # (P, 2, heads, tokens, L)
        source, target = probs[:, 0], probs[:, 1]
        edited = torch.where(self.keep, target, source @ self.weights) * self.equalizer
        probs = torch.stack([source, torch.where(self.cross, edited, target)], 1)
        if records:
            maps = (probs * self.blend_columns[None, :, None, None, :]).sum(-1).mean(2)
            self.maps.append(maps.sum(0))
        return probs.flatten(0, 1).to(v.dtype) @ v

    def self_attention(self, q, k, v, scale: float, mask, level: int) -> torch.Tensor:
        """The target's self-attention map becomes the source's (same queries and keys), where the step and
        the layer's level say so."""
        gate = self.self_gates[level]
        q, k = (torch.where(gate, _pairs(x)[:, :1].expand(-1, 2, -1, -1, -1), _pairs(x)).flatten(0, 1)
                for x in (q, k))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def blend_maps(self) -> torch.Tensor:
        """(2, tokens): the blend-word attention of this call, summed over the blend level's layers."""
        total = self.maps[0]
        for maps in self.maps[1:]:
            total = total + maps
        return total


class P2PProcessor:
    """A diffusers attention processor (same module handling as AttnProcessor2_0): plain attention, or
    steered by the call's `Steering`. Its only state is where its module sits in the UNet."""

    def __init__(self, level: int, records: bool):
        self.level, self.records = level, records

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 p2p: Steering | None = None):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        batch = hidden_states.shape[0]
        is_cross = encoder_hidden_states is not None
        if attention_mask is not None:
            length = (encoder_hidden_states if is_cross else hidden_states).shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = encoder_hidden_states if is_cross else hidden_states
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        q, k, v = (
            x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            for x in (attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context))
        )
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if p2p is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
        elif is_cross:
            out = p2p.cross_attention(q, k, v, attn.scale, attention_mask, self.records)
        else:
            out = p2p.self_attention(q, k, v, attn.scale, attention_mask, self.level)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if image_shape is not None:
            out = out.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def steer_attention(unet) -> None:
    """Sets the Prompt-to-Prompt processors on every attention module, once per UNet: without a `Steering`
    they compute plain attention, so the same UNet serves every method and is never re-hooked."""
    if all(isinstance(p, P2PProcessor) for p in unet.attn_processors.values()):
        return
    levels = len(unet.config["block_out_channels"])
    if levels > LEVELS:
        raise ValueError(f"prompt-to-prompt supports UNets of at most {LEVELS} levels, this one has {levels}")
    blend = blend_level(unet.config)
    unet.set_attn_processor({
        name: P2PProcessor(level, level == blend)
        for name in unet.attn_processors for level in (attention_level(name, levels),)
    })


def steered_call(unet, sample, timestep, control, **unet_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """One UNet call (processors set by `steer_attention`) under the control tensors: (eps, blend maps)."""
    steering = Steering(*control)
    eps = unet(sample, timestep, return_dict=False, cross_attention_kwargs={"p2p": steering}, **unet_kwargs)[0]
    return eps, steering.blend_maps()


class SteeredUNet(torch.nn.Module):
    """The steered reverse UNet as a module of tensor inputs: what torch.compile compiles, once per shape."""

    def __init__(self, unet):
        super().__init__()
        steer_attention(unet)
        self.unet = unet

    def forward(self, sample, timestep, control: tuple, timestep_cond=None, **cond_kwargs):
        return steered_call(self.unet, sample, timestep, control, timestep_cond=timestep_cond, **cond_kwargs)


def steered_eps(module, dtype: torch.dtype | None = None):
    """(x, t, cond, timestep_cond, control) -> (eps, blend maps) over a `SteeredUNet`, eager or compiled;
    `dtype` casts the latents (as `unet_eps` does)."""

    def run(x, t, cond, timestep_cond, control):
        if isinstance(t, torch.Tensor):
            timestep = t.to(x.device)
        else:
            timestep = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        sample = x if dtype is None else x.to(dtype)
        return module(sample, timestep, control, timestep_cond=timestep_cond, **cond.unet_kwargs())

    return run


class Steered:
    """Core's epsilon function over a steered run (any engine's): it feeds the control of the edit under
    way and hands the blend maps back to its controller."""

    def __init__(self, run):
        self.run = run
        self.controller: PromptToPrompt | None = None

    def __call__(self, x, t, cond, timestep_cond) -> torch.Tensor:
        if self.controller is None:
            raise ValueError("the steered UNet was called outside a prompt-to-prompt edit")
        eps, maps = self.run(x, t, cond, timestep_cond, self.controller.control())
        self.controller.observe(maps)
        return eps


@dataclass
class AttentionHost:
    """A runtime's steered reverse UNet (its `Steered` epsilon function and the denoiser around it), and the
    controllers of the prompt pairs it has edited: each built once."""

    steered: Steered
    denoiser: Denoiser
    device: torch.device
    _controllers: OrderedDict = field(default_factory=OrderedDict)

    def controller(self, tokenizer, source: str, target: str, num_steps: int, config: P2PConfig | None = None,
                   *, latent_size: tuple[int, int]) -> PromptToPrompt:
        """The controller of this edit, from the cache when the same prompts and settings were edited before."""
        config = config or P2PConfig()
        amplify = None if config.amplify is None else tuple(sorted(config.amplify.items()))
        key = (source, target, num_steps, config.cross_replace, config.self_replace, amplify, config.blend,
               config.blend_threshold, tuple(latent_size))
        if key in self._controllers:
            self._controllers.move_to_end(key)
        else:
            self._controllers[key] = PromptToPrompt(tokenizer, source, target, num_steps, config,
                                                    latent_size=latent_size)
            if len(self._controllers) > CACHED_CONTROLLERS:
                self._controllers.popitem(last=False)
        return self._controllers[key]

    @contextmanager
    def attached(self, controller: PromptToPrompt):
        """Steers the UNet's calls with `controller` for one decoding."""
        controller.start(self.device)
        self.steered.controller = controller
        try:
            yield controller
        finally:
            self.steered.controller = None
