"""What the checks before a batch cost: the header pass of `icd edit` over 100 items, next to one edit.

Before any model loads, `icd edit` plans every item (its output name, whether the output exists or is an
input) and reads each input's header (an image's format and size; a latent file's metadata and shape, and
that it belongs to the model). This times that pass on 100 photos (1024x768 PNG) and on 100 latent files of
the shipped `mini` model, and one whole `mini` edit (invert + decode, its 64x64 working size) in the same
process for scale. A real model's edit costs far more than mini's, so the ratio here is an upper bound.

Usage: python bench/validation_cost.py [--items 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from icd.app.batch import Item, plan  # noqa: E402
from icd.app.jobs import Settings, check_input, edit_file, invert_file  # noqa: E402
from icd.app.naming import output_stem  # noqa: E402
from icd.app.runner import LocalRunner  # noqa: E402
from icd.app.session import open_session  # noqa: E402
from icd.editing import edit_plan  # noqa: E402
from timing import median_ms  # noqa: E402  (bench/ is the script's folder)


def photo(path: Path, seed: int) -> Path:
    """A 1024x768 PNG with real texture (noise over a gradient), so its header is an ordinary photo's."""
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 200, 1024)[None, :, None] + np.zeros((768, 1, 3))
    pixels = np.clip(gradient + rng.normal(0, 20, (768, 1024, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    session = open_session("mini", "cpu", "fp32", "torch", directions=("forward", "reverse"))
    settings = Settings(runner=LocalRunner(session), model_ref="mini")
    manifest = session.manifest
    with tempfile.TemporaryDirectory(prefix="icd-validation-") as tmp:
        folder = Path(tmp)
        (folder / "photos").mkdir()
        (folder / "latents").mkdir()
        photos = [photo(folder / "photos" / f"p{i:03}.png", i) for i in range(args.items)]
        first = invert_file(settings, photos[0], "a red circle on a sandy background", 0,
                            folder / "latents" / "l000.latent.safetensors")
        latents = [first] + [Path(shutil.copy(first, folder / "latents" / f"l{i:03}.latent.safetensors"))
                             for i in range(1, args.items)]

        def header_pass(paths):
            items = [Item(str(path), path, folder / "out" / f"{output_stem(path)}-edit.png") for path in paths]
            plan(items, paths, overwrite=False, skip_existing=False,
                 check=lambda item: check_input(item.source, manifest, "mini"))
            assert all(item.runnable for item in items)

        edit = edit_plan(manifest, "a red circle on a sandy background", "a blue circle on a sandy background")
        edits = iter(range(10**6))
        rows = {
            f"header pass, {args.items} photos": median_ms(lambda: header_pass(photos), args.repeats),
            f"header pass, {args.items} latent files": median_ms(lambda: header_pass(latents), args.repeats),
            "one mini edit of a photo": median_ms(
                lambda: edit_file(settings, photos[0], edit, folder / "out" / f"e{next(edits)}.png"),
                args.repeats),
        }
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    edit_ms = rows["one mini edit of a photo"]
    for name, ms in rows.items():
        print(f"{name:36} {ms:9.1f} ms   {ms / edit_ms:6.2f} x one mini edit")


if __name__ == "__main__":
    main()
