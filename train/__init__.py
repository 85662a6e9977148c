"""Training (import name `icd_train`): guidance distillation, then the forward and reverse iCD LoRAs with the
preservation losses, on accelerate. `icd train` (icd.app.training) is its command line."""
