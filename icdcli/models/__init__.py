"""Model glue (diffusers): manifests, downloads, LoRA files, text encoders, the VAE and the UNets."""
