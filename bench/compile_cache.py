"""What the on-disk compile cache saves: two `icd edit --compile` processes, one after the other, on `mini`.

The first process compiles the UNets with inductor and leaves the kernels in $ICD_HOME/compiled; the second
finds them there. Both run from a fresh, empty $ICD_HOME, on the CPU, for one P2P photo edit. Also one
process without --compile, for scale.

Usage: python bench/compile_cache.py
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench.miniature

from bench.miniature.world import DEMO_SCENE, DEMO_TARGET, render  # noqa: E402


def edit(folder: Path, name: str, *extra: str) -> float:
    """Wall seconds of one `icd edit` process on the demo scene."""
    env = {**os.environ, "ICD_HOME": str(folder / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "icd", "edit", str(folder / "scene.png"), "--src", DEMO_SCENE.caption,
                    "--tgt", DEMO_TARGET.caption, "-m", "mini", "--device", "cpu", "--no-server", "-q",
                    "-o", str(folder / f"{name}.png"), *extra], env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="icd-compile-") as tmp:
        folder = Path(tmp)
        render(DEMO_SCENE, 64).image.convert("RGB").save(folder / "scene.png")
        rows = {"no --compile": edit(folder, "eager"),
                "--compile, first process (empty cache)": edit(folder, "first", "--compile"),
                "--compile, second process (cache filled)": edit(folder, "second", "--compile")}
        cached = sum(p.stat().st_size for p in (folder / "home" / "compiled").rglob("*") if p.is_file())
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"cache after the first process: {cached / 1e6:.1f} MB")
    for name, seconds in rows.items():
        print(f"{name:44} {seconds:7.1f} s wall")


if __name__ == "__main__":
    main()
