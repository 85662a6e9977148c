"""Prompt-to-Prompt's control of one edit in two-row iCD decoding: row 0 has the source prompt (the
reconstruction), row 1 the target (the edit), and row 1's attention is steered by row 0's:

- cross-attention: the source maps carried over to the target's tokens (Replace for prompts of as many words,
  else Refine from a token alignment), then amplified words reweighted;
- self-attention: the source's maps, in layers of at most latent/2 x latent/2 tokens;
- LocalBlend (`--mask-words`): outside the blend words' region the target latent is reset to the source. As
  officially, the region comes from the maps after the edit (the official store keeps references that the
  edit then overwrites in place).

Windows keep the official quantisation, so the paper's settings mean what they meant: with K steps,
cross-attention is replaced on steps [0, int(c*(K+1))) and self-attention on [0, int(s*K)).

The control is a few tensors fixed when the controller is built (`CONTROL_NAMES`; per step, a cross flag and a
self flag per UNet level), read by stateless processors: one graph serves every step and prompt pair.
LocalBlend reads the latent/4 level (16x16 at 512 px), else the coarsest one with cross-attention; on `mini`'s
4x4 grid the official 3x3 dilation selects nearly everything, so grids under `DILATED_GRID` a side are not
dilated. A map that selects nothing or everything is told with the result (`blend_notes`).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from ..editing import DEFAULT_AMPLIFY, MASK_WORDS_NOTE, P2PConfig
from ..errors import ICDError
from .geometry import LEVELS, level_grid
from .tokens import STOPWORDS, prompt_words, refinement_mapper, replacement_mapper, word_token_indices

CONTROL_NAMES = ("p2p_cross", "p2p_self", "p2p_weights", "p2p_keep", "p2p_equalizer", "p2p_blend")
DILATED_GRID = 8  # LocalBlend widens its map by one cell (3x3 max-pool) only on grids at least this fine


def step_windows(num_steps: int, cross_replace: float, self_replace: float) -> tuple[range, range]:
    """Steps (0-based) whose cross- and self-attention are replaced, quantised as the official code."""
    cross = min(int(cross_replace * (num_steps + 1)), num_steps)
    return range(cross), range(min(int(self_replace * num_steps), num_steps))


def _window_warnings(num_steps: int, cross_replace: float, self_replace: float) -> list[str]:
    """Fractions > 0 that the quantisation turns into no step at all (official bug #20)."""
    cross, self_ = step_windows(num_steps, cross_replace, self_replace)
    windows = (("cross_replace", cross_replace, cross, num_steps + 1), ("self_replace", self_replace, self_, num_steps))
    return [f"{name} {fraction:g} controls no step of {num_steps} (at least {math.ceil(100 / slots) / 100:g} is needed)"
            for name, fraction, steps, slots in windows if fraction > 0 and not steps]


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
        """The host settings a decoding reads besides its tensors (a captured loop's key): the blend and threshold."""
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


