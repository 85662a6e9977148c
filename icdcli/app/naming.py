"""How every command names its results: one template (`--name`, or a default whose parts appear only where
their value differs between the results) filled with FIELDS, in the input's format, PNG where icd cannot write
it, or `--format`'s. A user's template is checked before anything runs."""

from __future__ import annotations

import re
import string
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from icd.editing import EDIT_DEFAULTS
from icd.errors import ICDError, UsageError
from icd.files import real_path

# The fields a --name template may hold ({n}, the result's number in the command, last).
FIELDS = ("stem", "target", "seed", "method", "strength", "guidance", "tau", "n")
# --format's choices and the suffix each writes; "jpeg" is the same as "jpg".
FORMATS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "webp": ".webp"}


def listed(words) -> str:
    """Words as a sentence lists them: `a, b or c`."""
    *first, last = words
    return f"{', '.join(first)} or {last}"


# How help texts and errors name the formats: the suffixes results get, and every suffix --format knows.
WRITTEN_SUFFIXES, KNOWN_SUFFIXES = listed(dict.fromkeys(FORMATS.values())), listed("." + name for name in FORMATS)
SLUG_LIMIT = 40
# How many parent folders may be put in front of a name to tell apart two inputs of the same name.
MAX_NAME_DEPTH = 4
# The parts of a default edit name, in order, each added when its value differs between the results.
EDIT_PARTS = (("target", "-{target}"), ("seed", "-s{seed}"), ("guidance", "-g{guidance}"), ("tau", "-tau{tau}"),
              ("strength", "-strength{strength}"))


def slug(text: str) -> str:
    """A file-name-safe short form of a prompt: lower-case words joined by '-', cut at a word within SLUG_LIMIT."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if len(words) > SLUG_LIMIT:
        cut = words[: SLUG_LIMIT + 1].rfind("-")
        words = words[:cut] if cut > 0 else words[:SLUG_LIMIT]
    return words or "image"


def output_stem(path: Path) -> str:
    """An input's name without its suffix (`x.latent.safetensors` -> `x`)."""
    from icd.latents import LATENT_NAME

    return path.name.removesuffix(LATENT_NAME) if path.name.endswith(LATENT_NAME) else path.stem


class _Filler(string.Formatter):
    """str.format over plain values, numbers shown as a person writes them (19, 0.25) unless a spec says."""

    def format_field(self, value, format_spec):
        return format(value, format_spec or ("g" if isinstance(value, float) else ""))


SAMPLE = {"stem": "x", "target": "a-dog", "seed": 0, "strength": 0.5, "n": 1, **asdict(EDIT_DEFAULTS["sd15"])}


@dataclass(frozen=True)
class Naming:
    """A command's --name template and --format suffix (None: the command's default, each input's own)."""

    template: str | None = None
    suffix: str | None = None

    def fill(self, default: str, values: dict) -> str:
        """The name (without suffix) for one result."""
        return fill(self.template or default, values)


def fill(template: str, values: dict) -> str:
    return _Filler().vformat(template, (), values)


def naming(template: str | None, format_name: str | None, fields: tuple[str, ...], suffixes=FORMATS) -> Naming:
    """--name and --format checked for a command that knows `fields` and writes `suffixes` ({format: suffix}).
    A template may end with a suffix of those: it chooses the format as --format would."""
    suffix = None if format_name is None else suffixes[format_name.lower()]
    if template is None:
        return Naming(None, suffix)
    for ending, named in sorted(suffixes.items(), key=lambda pair: len(pair[0]), reverse=True):
        if template.lower().endswith("." + ending) and len(template) > len(ending) + 1:
            if suffix is not None and suffix != named:
                raise UsageError(f"--name {template} ends with .{ending}, but --format asks for {suffix}: give one")
            template, suffix = template[: -len(ending) - 1], named
            break
    if any(char in template for char in "/\\\0") or template.strip(". ") == "":
        raise UsageError(f"--name {template}: a file name without folders (-o chooses the folder)")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise UsageError(f"--name {template}: {err} (write {{{{ and }}}} for a brace)") from None
    known = ", ".join(f"{{{field}}}" for field in fields)
    for _, field, _, conversion in parsed:
        if field is not None and field not in fields:
            raise UsageError(f"--name {template}: unknown field {{{field}}}: this command knows {known}")
        if conversion:
            raise UsageError(f"--name {template}: no conversions (!{conversion}) in a field")
    try:
        fill(template, SAMPLE)
    except (ValueError, TypeError) as err:
        raise UsageError(f"--name {template}: {err}") from None
    return Naming(template, suffix)


def kept_suffix(path: Path) -> str:
    """A result's default format: the input's own (a latent file's: its photo's) where icd writes it, else PNG."""
    from icd.images import OUTPUT_SUFFIXES
    from icd.latents import is_latent_file, read_latent_info

    if is_latent_file(path):
        try:
            path = Path(read_latent_info(path).source or "")
        except ICDError:  # a broken latent file fails as its own item
            return ".png"
    return path.suffix.lower() if path.suffix.lower() in OUTPUT_SUFFIXES else ".png"


def edit_template(varying: set[str]) -> str:
    """The default name of an edit's results: NAME-edit, then each EDIT_PARTS part whose value varies."""
    return "{stem}-edit" + "".join(part for field, part in EDIT_PARTS if field in varying)


def refuse_clashes(items: list, template: str, fields: tuple[str, ...]) -> None:
    """A user's template must give each result its own file; else name two results and the fields to add."""
    seen: dict[str, object] = {}
    for item in items:
        key = str(real_path(item.output)).casefold()
        if key in seen:
            other = seen[key]
            differing = [field for field in fields if field in item.values and field in other.values
                         and item.values[field] != other.values[field] and field != "n"]
            hint = f"add {', '.join('{' + field + '}' for field in differing)}" if differing else "add {n}"
            raise UsageError(f"--name {template}: {other.label} and {item.label} would both be written to "
                             f"{item.output}: {hint}")
        seen[key] = item


def output_path(output: str | None, default_name: str, many: bool) -> Path:
    """`-o` is the file for a single result, or the folder for several; default: the current folder."""
    from icd.images import OUTPUT_SUFFIXES
    from icd.latents import LATENT_SUFFIX

    if output is None:
        return Path(default_name)
    target = Path(output)
    if not many and (target.suffix.lower() in OUTPUT_SUFFIXES or target.name.endswith(LATENT_SUFFIX)):
        return target
    return target / default_name


def distinct_stems(paths: list[Path], suffixes: dict[Path, str]) -> dict[Path, str]:
    """Each input's {stem}; inputs whose results would share a name and format get their parent folders' names
    in front (a/x.png and b/x.png -> a-x, b-x). Inputs that cannot be told apart are a UsageError."""
    names = {path: output_stem(path) + suffixes[path] for path in paths}
    for depth in range(1, MAX_NAME_DEPTH + 1):
        if not (clashes := _clashes(names)):
            break
        for path in (p for group in clashes for p in group):
            names[path] = "-".join([*real_path(path).parent.parts[1:][-depth:], output_stem(path) + suffixes[path]])
    if clashes := _clashes(names):
        first, second = clashes[0][:2]
        raise UsageError(f"{first} and {second} would both be written to {names[first]}: run them separately")
    return {path: names[path][: len(names[path]) - len(suffixes[path])] for path in paths}


def _clashes(names: dict[Path, str]) -> list[list[Path]]:
    groups: dict[str, list[Path]] = defaultdict(list)
    for path, name in names.items():
        groups[name.lower()].append(path)  # case-insensitive file systems clash on case alone
    return [group for group in groups.values() if len(group) > 1]
