"""Training of the forward and reverse iCD LoRAs (issue: train/). Not implemented yet."""
