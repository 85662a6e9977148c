"""`icd eval`'s library: editing benchmarks read from the user's own copy (PIE-Bench, the iCD authors' CSVs, a
folder with metadata.jsonl), their metrics, and the results, tables and pictures a run writes. It runs no
model of its own (the app edits through a runner) and ships no benchmark file."""

# What `icd eval` offers, here without torch for its help: where an edit may act (nowhere in particular, the data
# set's region, its blend words), the settings a run can sweep, and each metric model's hub id by default.
MASK_USES = ("none", "mask", "words")
SWEEPABLE = ("method", "guidance", "tau", "strength", "cross_replace", "self_replace", "mask_use", "keep_outside")
DEFAULT_MODELS = {"clip": "openai/clip-vit-large-patch14", "dino": "facebook/dino-vitb8",
                  "dinov2": "facebook/dinov2-base", "image_reward": "ImageReward-v1.0"}
