"""Prompt-to-Prompt in the UNet: attention processors set once on the reverse UNet, steered per call by the
edit's control tensors (`Steering`), the steered UNet as a module of tensor inputs (what torch.compile and the
ONNX export take), and `AttentionHost`, a runtime's steered UNet with the controllers of the prompt pairs it
has edited."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..core.denoiser import Denoiser
from ..editing import P2PConfig
from ..models.loading import unet_inputs
from .control import PromptToPrompt
from .geometry import LEVELS, attention_level, blend_level

CACHED_CONTROLLERS = 16


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
        """The target's self-attention map becomes the source's where the step and the layer's level say so."""
        gate = self.self_gates[level]
        q, k = (torch.where(gate, _pairs(x)[:, :1].expand(-1, 2, -1, -1, -1), _pairs(x)).flatten(0, 1)
                for x in (q, k))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def blend_maps(self) -> torch.Tensor:
        """(2, tokens): the blend-word attention of this call, summed over the blend level's layers."""
        return sum(self.maps[1:], self.maps[0])


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


class SteeredUNet(torch.nn.Module):
    """The reverse UNet steered by Prompt-to-Prompt as a module of tensor inputs (what torch.compile and the ONNX
    export take). Its processors, set once, compute plain attention without a `Steering`: one UNet for all."""

    def __init__(self, unet):
        super().__init__()
        if not all(isinstance(p, P2PProcessor) for p in unet.attn_processors.values()):
            levels = len(unet.config["block_out_channels"])
            if levels > LEVELS:
                raise ValueError(f"prompt-to-prompt supports UNets of at most {LEVELS} levels, this one has {levels}")
            blend = blend_level(unet.config)
            unet.set_attn_processor({name: P2PProcessor(level, level == blend) for name in unet.attn_processors
                                     for level in (attention_level(name, levels),)})
        self.unet = unet

    def forward(self, sample, timestep, control: tuple, timestep_cond=None,
                **unet_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """One UNet call under the control tensors: (eps, blend maps)."""
        steering = Steering(*control)
        eps = self.unet(sample, timestep, timestep_cond=timestep_cond, return_dict=False,
                        cross_attention_kwargs={"p2p": steering}, **unet_kwargs)[0]
        return eps, steering.blend_maps()


def steered_eps(module, dtype: torch.dtype | None = None):
    """(x, t, cond, timestep_cond, control) -> (eps, blend maps) over a `SteeredUNet`, as `unet_eps` does."""

    def run(x, t, cond, timestep_cond, control):
        sample, timestep = unet_inputs(x, t, dtype)
        return module(sample, timestep, control, timestep_cond=timestep_cond, **cond.unet_kwargs())

    return run


class AttentionHost:
    """A runtime's steered reverse UNet (`run`, any engine's) as core's epsilon function, fed the control of the
    edit under way and handing its blend maps back; the denoiser around it; the controllers it built, kept."""

    def __init__(self, run, device: torch.device, guided: Callable[[object], Denoiser]):
        self.run, self.device = run, device
        self.denoiser = guided(self)
        self.attached_controller: PromptToPrompt | None = None
        self._controllers: OrderedDict = OrderedDict()

    def __call__(self, x, t, cond, timestep_cond) -> torch.Tensor:
        if self.attached_controller is None:
            raise ValueError("the steered UNet was called outside a prompt-to-prompt edit")
        eps, maps = self.run(x, t, cond, timestep_cond, self.attached_controller.control())
        self.attached_controller.observe(maps)
        return eps

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
        self.attached_controller = controller
        try:
            yield controller
        finally:
            self.attached_controller = None
