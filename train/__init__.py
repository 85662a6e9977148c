"""Training (import name `icd_train`): guidance distillation, then the forward and reverse iCD LoRAs with the
preservation losses, on accelerate. `icd train` (icd.app.cli.train) is its command line."""
