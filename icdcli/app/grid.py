"""`--grid FILE`: one command's results as a labelled contact sheet: a row per input (and value of the other
dimensions), its photo first; the columns are the swept settings, else the seeds, else the targets. Written
with icd's record, so that a later run over the folder does not take it for a photo."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from icd import __version__
from icd.errors import ICDError, UsageError
from icd.files import real_path

from .naming import WRITTEN_SUFFIXES
from .planning import SWEPT

if TYPE_CHECKING:
    from PIL import Image

MAX_ROWS = 64  # one sheet; more rows than this want separate runs
PLACEHOLDER = (200, 200, 200)


@dataclass
class Sheet:
    path: Path
    rows: list[tuple[Path | None, str, list]]  # the input (None: a prompt), its label, the row's items
    columns: tuple[str, ...]  # the dimensions each row's items differ in

    def caption(self, item) -> str:
        return ", ".join(_label(name, item.values[name]) for name in self.columns)


def _label(dimension: str, value) -> str:
    if dimension == "target":
        return str(value)
    return f"{dimension} {value:g}" if isinstance(value, float) else f"{dimension} {value}"


def layout(path: str, items: list, dimensions: tuple[str, ...], with_inputs: bool = True) -> Sheet:
    """The sheet of `items`, whose `values` hold the `dimensions` that vary, checked before any model loads."""
    from icd.images import OUTPUT_SUFFIXES

    if Path(path).suffix.lower() not in OUTPUT_SUFFIXES:
        raise UsageError(f"--grid {path}: name a {WRITTEN_SUFFIXES} file")
    columns = tuple(name for name in dimensions if name in SWEPT) or dimensions[-1:]
    across = tuple(name for name in dimensions if name not in columns)
    rows: dict[tuple, list] = {}
    for item in items:
        rows.setdefault((item.source if with_inputs else None, *(item.values[d] for d in across)), []).append(item)
    if len(rows) > MAX_ROWS:
        raise UsageError(f"--grid {path}: {len(rows)} rows (inputs x {' x '.join(across) or 'nothing'}) is more "
                         f"than one sheet shows ({MAX_ROWS}): run fewer inputs at a time")
    sheet_rows = []
    for (source, *values), row_items in rows.items():
        named = ([Path(str(source)).name] if source is not None else []) + \
            [_label(name, value) for name, value in zip(across, values)]
        sheet_rows.append((source, ", ".join(named), row_items))
    return Sheet(Path(path), sheet_rows, columns)


def check_place(sheet: Sheet, items: list, reads: list[Path], overwrite: bool) -> None:
    """The sheet's file is none of the command's inputs or results, and is not replaced unasked."""
    from .distributed import current_launch

    if current_launch().several:
        raise UsageError("--grid needs the whole batch in one process: run it without torchrun/accelerate")
    taken = {real_path(path) for path in reads} | {real_path(path) for item in items for path in item.outputs}
    if real_path(sheet.path) in taken:
        raise UsageError(f"--grid {sheet.path} is also an input or a result of this command: choose another file")
    if sheet.path.exists() and not overwrite:
        raise UsageError(f"--grid {sheet.path} exists (use --overwrite to replace it)")


def describe(sheet: Sheet, as_json: bool) -> None:
    """--dry-run's line for the sheet."""
    from .batch import stdout_line

    shape = f"{len(sheet.rows)} row(s) x {max((len(items) for _, _, items in sheet.rows), default=0)} result(s)"
    stdout_line(json.dumps({"grid": str(sheet.path), "status": "planned", "shape": shape}) if as_json
                else f"grid -> {sheet.path}: {shape}")


def _panel(path: Path | None) -> Image.Image | None:
    """A picture at most a panel high (a large photo is shrunk, a small one left for labelled_row to enlarge)."""
    from PIL import Image

    from icd.images import load_image

    from .demo import PANEL_HEIGHT

    if path is None:
        return None
    try:
        image = load_image(path).rgb
    except ICDError:
        return None
    if image.height > PANEL_HEIGHT:
        image = image.resize((max(1, round(image.width * PANEL_HEIGHT / image.height)), PANEL_HEIGHT),
                             Image.Resampling.LANCZOS)
    return image


def write(sheet: Sheet, overwrite: bool, as_json: bool, quiet: bool) -> bool:
    """Draw and write the sheet from the results on disk (a failed one grey); False when none is there."""
    from PIL import Image

    from icd.images import save_image
    from icd.latents import is_latent_file

    from .batch import stdout_line
    from .demo import labelled_row

    drawn = []
    for source, label, row_items in sheet.rows:
        results = [_panel(None if item.error else item.output) for item in row_items]
        size = next((image.size for image in results if image is not None), None)
        if size is None:
            continue
        photo = None if source is None or is_latent_file(source) else _panel(source)
        panels = ([(photo or Image.new("RGB", size, PLACEHOLDER), label)] if source is not None else []) + \
            [(image or Image.new("RGB", size, PLACEHOLDER), sheet.caption(item) + ("" if image else " (failed)"))
             for image, item in zip(results, row_items)]
        drawn.append(labelled_row(panels))
    if not drawn:
        return False
    canvas = Image.new("RGB", (max(row.width for row in drawn), sum(row.height for row in drawn)), "white")
    top = 0
    for row in drawn:
        canvas.paste(row, (0, top))
        top += row.height
    save_image(canvas, sheet.path, overwrite=overwrite,
               metadata={"command": "grid", "icd_version": __version__, "rows": len(drawn),
                         "columns": sheet.columns})
    if as_json or not quiet:
        stdout_line(json.dumps({"grid": str(sheet.path), "status": "ok"}) if as_json else str(sheet.path))
    return True
