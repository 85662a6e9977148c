"""The core: the paper's math, the denoiser contract and the samplers. Torch only: no diffusers, no files."""
