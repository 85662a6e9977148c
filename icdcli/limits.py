"""The sizes icd refuses before any work, and the numbers of its outputs, shared by every layer that uses one.

Plain numbers without imports, so that the command line can declare its options with them without loading
numpy or PIL (`icd --help` stays instant).
"""

# The largest working side in pixels: --width/--height, a manifest's `resolution`, a latent file's recorded
# size (and so its tensor's). SD1.5 works at 512 and SDXL at 1024; at twice SDXL's side (four times its
# area) these models already repeat their subjects, and a UNet call's first attention level holds
# (side / 8)² tokens whose cost grows with their square: a 4096-pixel working size runs for minutes per
# picture on a CPU and a claimed 200000 exhausts the memory. So anything past 2048 is a typo or an attack.
MAX_SIDE = 2048
MAX_SEED = 2**64 - 1  # what torch's generators take
DEFAULT_QUALITY = 95  # of JPEG and WebP results (--quality)
