"""Prompt-to-Prompt as tensors, along its seams: `tokens` (which target tokens take which source tokens'
attention), `geometry` (where in a diffusers UNet it acts), `control` (one edit's control tensors, windows and
LocalBlend) and `attention` (the processors, the steered UNet and the runtime's host of it)."""

from .attention import AttentionHost, P2PProcessor, SteeredUNet, Steering, steered_eps
from .control import CONTROL_NAMES, DEFAULT_AMPLIFY, PromptToPrompt, step_windows
from .geometry import LEVELS, attention_level, blend_level, level_grid

__all__ = ["AttentionHost", "CONTROL_NAMES", "DEFAULT_AMPLIFY", "LEVELS", "P2PProcessor", "PromptToPrompt",
           "SteeredUNet", "Steering", "attention_level", "blend_level", "level_grid", "step_windows", "steered_eps"]
