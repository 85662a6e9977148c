"""Facts of the officially released iCD models, in one place: what loading, pulling, training and test models
must agree on."""

GUIDANCE_EMBED_DIM = 512  # e(w) width of the CFG-distilled teachers
LORA_RANK = 64
LORA_ALPHA = 8.0  # peft's default: the released LoRA files store no alpha, and were trained at 8 / 64
# The modules the official training adapts (matched as module-name suffixes).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
# The SD1.5 4-step boundaries of the paper.
FORWARD_TIMESTEPS = (19, 259, 519, 779)
REVERSE_TIMESTEPS = (259, 519, 779, 999)
GUIDANCE_SCALES = (0.0, 7.0, 11.0, 15.0, 19.0)  # w values of guidance distillation and reverse CD
EDIT_METHODS = ("p2p", "swap", "none")  # what icd.pipeline.edit can do
DIRECTIONS = ("forward", "reverse")  # the two consistency models: image -> noise, noise -> image
PRECISION_NAMES = ("fp32", "fp16", "bf16")  # the dtypes a model runs and is exported in
KINDS = ("sd15", "sdxl")  # the base architectures a model is built on
RESOLUTION = dict(zip(KINDS, (512, 1024)))  # each kind's default side in pixels
