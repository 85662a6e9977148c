"""`python -m train ...` (what `accelerate launch -m train` runs on every process) = `icd train ...`."""

import logging

from .cli import train

logging.basicConfig(format="icd: %(levelname)s: %(message)s", level=logging.INFO)
train(prog_name="icd train")
