"""`python -m icd ...` = `icd ...`, e.g. `accelerate launch -m icd train icd ...` on every process."""

from icd.app.cli import main

main(prog_name="icd")
