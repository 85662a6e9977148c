"""README's Python example runs as written, on `mini` instead of `sd15` (the one thing changed), and edits."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from icd.models.hub import resolve_model

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    section = README.read_text(encoding="utf-8").split("\n## Python\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_edits_a_photo(tmp_path, monkeypatch):
    code = python_example()
    assert 'open_session("sd15", ' in code and '"photo.jpg"' in code and '"bear.png"' in code
    manifest = resolve_model("mini")
    picture, source, target = manifest.demo
    monkeypatch.chdir(tmp_path)
    Image.open(picture).convert("RGB").save("photo.jpg", quality=95)
    code = code.replace('"sd15"', '"mini"').replace('"a pug"', repr(source)).replace('"a bear"', repr(target))
    exec(compile(code.replace('dtype="auto"', 'dtype="fp32"'), "README.md", "exec"), {})
    edited = Image.open("bear.png")
    photo = Image.open("photo.jpg")
    assert edited.size == photo.size
    assert np.abs(np.asarray(edited, np.float32) - np.asarray(photo.convert("RGB"), np.float32)).mean() > 1.0
