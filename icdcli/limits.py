"""The sizes icd refuses before any work, and the numbers of its outputs, shared by every layer: plain numbers
without imports, so that the command line declares its options with them without numpy or PIL."""

# The largest working side in pixels (--width/--height, a manifest's `resolution`, a latent file's size). At
# twice SDXL's side these models already repeat their subjects, and the first attention level's cost grows with
# (side / 8)⁴: 4096 runs for minutes a picture on a CPU, a claimed 200000 exhausts the memory. Past 2048 is a
# typo or an attack.
MAX_SIDE = 2048
MAX_SEED = 2**64 - 1  # what torch's generators take
DEFAULT_QUALITY = 95  # of JPEG and WebP results (--quality)
