"""Prompt-to-Prompt attention control for two-row iCD decoding.

Every UNet call sees row 0 = source prompt (the faithful reconstruction) and row 1 = target prompt
(the edit); row 1's attention is steered by row 0's:

- cross-attention: the source maps are carried over to the target's tokens (Replace when the prompts
  have as many words, Refine from a token alignment otherwise), then amplified words are reweighted;
- self-attention: the target uses the source's maps, in layers of at most latent/2 x latent/2 tokens;
- LocalBlend: outside the region of the blend words the target latent is reset to the source.

Windows keep the official quantisation so the paper's launch settings mean what they meant: with K
steps, cross-attention is replaced on steps [0, int(c*(K+1))) and self-attention on [0, int(s*K)).
"""

from __future__ import annotations

import math
import string
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .core.denoiser import Denoiser
from .errors import ICDError

DEFAULT_AMPLIFY = 4.0
STOPWORDS = frozenset(
    "a an the and or but of in on at to with without for from by as is are was were be been this that these "
    "those it its his her their my your our into onto over under near".split()
)


@dataclass
class P2PConfig:
    """How strongly the edit follows the source (fractions of the decoding steps) and what it stresses."""

    cross_replace: float = 0.3
    self_replace: float = 0.6
    amplify: dict[str, float] | None = None  # None: new target words (not stopwords) x DEFAULT_AMPLIFY
    blend: tuple[tuple[str, ...], tuple[str, ...]] | None = None  # (source words, target words)
    blend_threshold: float = 0.3


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


class PromptToPrompt:
    """The controller: decides per layer and step whether attention is edited, and runs LocalBlend."""

    def __init__(self, tokenizer, source: str, target: str, num_steps: int, config: P2PConfig | None = None,
                 *, latent_size: tuple[int, int]):
        config = config or P2PConfig()
        for name in ("cross_replace", "self_replace"):
            if not 0.0 <= getattr(config, name) <= 1.0:
                raise ICDError(f"{name} must be between 0 and 1, got {getattr(config, name)}")
        self.cross_steps, self.self_steps = step_windows(num_steps, config.cross_replace, config.self_replace)
        self.warnings = _window_warnings(num_steps, config.cross_replace, config.self_replace)
        self.latent_size = tuple(latent_size)
        self._self_max_tokens = self.latent_size[0] * self.latent_size[1] / 4
        length = tokenizer.model_max_length

        if len(source.split()) == len(target.split()):
            self._weights = replacement_mapper(tokenizer, source, target)
            self._keep = torch.zeros(length, dtype=torch.bool)
        else:
            mapping = refinement_mapper(tokenizer, source, target)
            self._weights = torch.zeros(length, length)
            for t, s in enumerate(mapping):
                if s is not None:
                    self._weights[s, t] = 1.0
            self._keep = torch.tensor([s is None for s in mapping])  # new tokens keep the target's maps

        source_words = set(prompt_words(source))
        self.amplify = dict(config.amplify) if config.amplify is not None else {
            w: DEFAULT_AMPLIFY for w in dict.fromkeys(prompt_words(target))
            if w and w not in source_words and w not in STOPWORDS
        }
        self._equalizer = torch.ones(length)
        for word, factor in self.amplify.items():
            self._equalizer[self._positions(tokenizer, target, word, "amplified")] = factor

        self._blend_columns = None
        if config.blend is not None:
            self._blend_columns = torch.zeros(2, length)
            for row, (prompt, words) in enumerate(zip((source, target), config.blend, strict=True)):
                for word in words:
                    self._blend_columns[row, self._positions(tokenizer, prompt, word, "blend")] = 1.0
        self._threshold = config.blend_threshold
        self._reset()

    def _positions(self, tokenizer, prompt: str, word: str, role: str) -> list[int]:
        positions = word_token_indices(tokenizer, prompt, word)
        if not positions:
            self.warnings.append(f"{role} word {word!r} is not a word of {prompt!r}")
        return positions

    def _reset(self) -> None:
        self.step = 0
        self._maps: dict[int, torch.Tensor] = {}  # query tokens -> (2, tokens) blend-word attention, summed
        self._blend_tokens: int | None = None  # the layer size LocalBlend reads, known after step 0

    def start(self, device: torch.device) -> None:
        """Ready for a new decoding on `device`."""
        self._reset()
        self._weights, self._keep, self._equalizer = (t.to(device) for t in (self._weights, self._keep, self._equalizer))
        if self._blend_columns is not None:
            self._blend_columns = self._blend_columns.to(device)

    def after_step(self, step: int, x: torch.Tensor) -> torch.Tensor:
        """LocalBlend on the jumped latents (2 rows), then moves on to the next step."""
        if step != self.step:
            raise ValueError(f"after_step({step}) called while the controller is at step {self.step}")
        if self._blend_columns is not None:
            x = self._blend(x)
        self.step += 1
        return x

    def _records(self, tokens: int) -> bool:
        return self._blend_columns is not None and self._blend_tokens in (None, tokens)

    def _attend(self, q, k, v, scale: float, mask, is_cross: bool) -> torch.Tensor:
        """Attention of one module for (batch, heads, tokens, dim) inputs, edited where this step asks."""
        tokens = q.shape[2]
        edit_cross = is_cross and self.step in self.cross_steps
        record = is_cross and self._records(tokens)
        edit_self = not is_cross and self.step in self.self_steps and tokens <= self._self_max_tokens
        if (edit_cross or record or edit_self) and q.shape[0] != 2:
            raise ValueError(f"prompt-to-prompt needs a batch of 2 rows (source, target), got {q.shape[0]}")
        if edit_cross or record:
            scores = q.float() @ k.float().transpose(-1, -2) * scale
            probs = (scores if mask is None else scores + mask).softmax(-1)
            if record:
                self._record(probs, tokens)
            if edit_cross:
                probs = self._edit_cross(probs)
            return probs.to(v.dtype) @ v
        if edit_self:  # the target's self-attention map becomes the source's: same queries and keys
            q, k = q[:1].expand_as(q), k[:1].expand_as(k)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def _edit_cross(self, probs: torch.Tensor) -> torch.Tensor:
        """Row 1's cross-attention from row 0's mapped to the target tokens, then reweighted."""
        mapped = probs[0] @ self._weights
        target = torch.where(self._keep, probs[1], mapped) * self._equalizer
        return torch.stack([probs[0], target])

    def _record(self, probs: torch.Tensor, tokens: int) -> None:
        """Adds the head-averaged attention on each row's blend words (pre-edit, as officially)."""
        maps = (probs * self._blend_columns[:, None, None, :]).sum(-1).mean(1)
        self._maps[tokens] = self._maps.get(tokens, 0) + maps

    def _grid(self, tokens: int) -> tuple[int, int]:
        """The (h, w) of a UNet level with `tokens` positions (each level halves, rounding up)."""
        h, w = self.latent_size
        while h * w > tokens:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if h * w != tokens:
            raise ValueError(f"no UNet level of latent {self.latent_size} has {tokens} positions")
        return h, w

    def _blend(self, x: torch.Tensor) -> torch.Tensor:
        """Keeps the target only where the source or target blend words are attended (LocalBlend)."""
        if self._blend_tokens is None:  # latent/4 layers (16x16 at 512px), else the coarsest ones
            quarter = math.ceil(self.latent_size[0] / 4) * math.ceil(self.latent_size[1] / 4)
            self._blend_tokens = quarter if quarter in self._maps else min(self._maps)
            self._maps = {self._blend_tokens: self._maps[self._blend_tokens]}
        # Summed over layers rather than averaged: the max normalisation below removes the factor.
        maps = self._maps[self._blend_tokens].view(2, 1, *self._grid(self._blend_tokens))
        maps = F.max_pool2d(maps, 3, stride=1, padding=1)
        maps = F.interpolate(maps, size=x.shape[-2:], mode="nearest")
        maps = maps / maps.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
        mask = (maps > self._threshold).any(0)  # source-row mask OR target-row mask
        return torch.stack([x[0], torch.where(mask, x[1], x[0])])


@dataclass
class AttentionHost:
    """The eager PyTorch UNet whose attention Prompt-to-Prompt steers, and the denoiser that calls it."""

    unet: Any
    denoiser: Denoiser

    @contextmanager
    def attached(self, controller: PromptToPrompt):
        """Routes every attention module of the UNet through `controller` for one decoding."""
        original = self.unet.attn_processors
        controller.start(self.unet.device)
        self.unet.set_attn_processor(_Processor(controller))
        try:
            yield controller
        finally:
            self.unet.set_attn_processor(original)


class _Processor:
    """A diffusers attention processor (same module handling as AttnProcessor2_0) that defers to P2P."""

    def __init__(self, controller: PromptToPrompt):
        self.controller = controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
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
        out = self.controller._attend(q, k, v, attn.scale, attention_mask, is_cross)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if image_shape is not None:
            out = out.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
