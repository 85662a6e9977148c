"""Write tests/pinned/data/: the current outputs of the `icd` commands that tests/test_pinned_outputs.py checks.

Run from anywhere, with the project importable (PYTHONPATH=<checkout> or an install):

    python tests/pinned/make_pinned.py [--model mini --model tiny]

The commands, inputs and file names come from tests/test_pinned_outputs.py, so the test and this script
cannot drift apart. The tiny model is built from seed 0 into a fresh temporary ICD_HOME each time, as the
test's `icd_home` fixture does; torch uses one thread, as in tests/conftest.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

# The same setting as tests/conftest.py, before any Hugging Face library is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS.parent)]  # tests/ (fixtures) and the checkout (bench.miniature)

import torch  # noqa: E402

import test_pinned_outputs as pinned  # noqa: E402
from fixtures.tiny import TINY_KINDS, build_tiny_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=pinned.MODELS,
                        help="Only these models (repeatable). Default: all.")
    parser.add_argument("--out", type=Path, default=pinned.PINNED, help="Where the pinned files go.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="icd-pinned-") as tmp:
        os.environ["ICD_HOME"] = str(Path(tmp) / "icd-home")
        for name, kind in TINY_KINDS.items():
            build_tiny_model(Path(tmp) / "icd-home" / "models" / name, kind=kind)
        for model in args.model or pinned.MODELS:
            produced = pinned.run_cases(model, Path(tmp) / model)
            for name, path in produced.items():
                target = args.out / name
                pinned.write_pinned(path, target)
                print(f"{target}  {target.stat().st_size} bytes")
    total = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"{args.out}: {total} bytes in all")


if __name__ == "__main__":
    main()
