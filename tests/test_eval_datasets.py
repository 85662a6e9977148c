"""icd eval's data sets: PIE-Bench's run-length masks, and the three readers on small fixtures written here."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from icd.errors import InputError, UsageError
from icd.evaluation.datasets import blend_words, decode_rle, open_dataset, select, without_brackets


def test_run_length_mask_as_the_benchmark_decodes_it():
    """(start, length) pairs over the image row by row, clipped at the end, then the border set."""
    mask = decode_rle([8, 2, 14, 3, 33, 10], shape=(6, 6))
    expected = np.array([[1, 1, 1, 1, 1, 1],
                         [1, 0, 1, 1, 0, 1],
                         [1, 0, 1, 1, 1, 1],
                         [1, 0, 0, 0, 0, 1],
                         [1, 0, 0, 0, 0, 1],
                         [1, 1, 1, 1, 1, 1]], dtype=bool)
    assert mask.dtype == bool and np.array_equal(mask, expected)
    assert decode_rle([], shape=(4, 4)).sum() == 12  # the border alone
    for broken in ([1, 2, 3], [-1, 2], [[1, 2]]):
        with pytest.raises(ValueError, match="not a flat list of \\(start, length\\) pairs"):
            decode_rle(broken, shape=(4, 4))


def test_prompts_and_blend_words():
    assert without_brackets("a [cat] sitting on [a  red] sofa") == "a cat sitting on a red sofa"
    assert blend_words(["Cat", "dog"], "a cat", "a dog") == (("cat",), ("dog",))
    assert blend_words(["cat", "dog", "hat"], "a cat", "a dog with a hat") == (("cat",), ("dog", "hat"))
    assert blend_words(["cat"], "a cat", "a dog") is None
    assert blend_words([], "a cat", "a dog") is None


def picture(path, size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 100, 50)).save(path)


def test_pie_bench_folder(tmp_path):
    runs = [0, 10, 300, 5]
    mapping = {
        "000000000001": {"image_path": "1_change_object_80/1_artificial/000000000001.jpg",
                         "original_prompt": "a [cat] on a sofa", "editing_prompt": "a [dog] on a sofa",
                         "editing_instruction": "make it a dog", "editing_type_id": "1", "blended_word": "cat dog",
                         "mask": runs},
        "000000000000": {"image_path": "0_random_140/000000000000.jpg", "original_prompt": "a house",
                         "editing_prompt": "a [red] house", "editing_type_id": "0", "blended_word": "",
                         "mask": [1, 2, 3]},
        "000000000002": {"image_path": "../outside.jpg", "original_prompt": "x", "editing_prompt": "y",
                         "editing_type_id": "0", "blended_word": "", "mask": []},
        "000000000003": {"original_prompt": "x"},
    }
    (tmp_path / "mapping_file.json").write_text(json.dumps(mapping))
    data = open_dataset(tmp_path)
    assert data.kind == "pie-bench" and not data.square
    (item,) = data.items
    assert (item.id, item.kind, item.source, item.target, item.blend) == (
        "000000000001", "change object", "a cat on a sofa", "a dog on a sofa", (("cat",), ("dog",)))
    assert item.image == tmp_path / "annotation_images" / "1_change_object_80/1_artificial/000000000001.jpg"
    assert item.edit_name == "1_change_object_80/1_artificial/000000000001.png"
    assert np.array_equal(item.mask(), decode_rle(runs).astype(np.float32)) and item.mask().shape == (512, 512)
    assert data.problems == [
        "mapping_file.json 000000000000: the mask is not a flat list of (start, length) pairs of whole numbers >= 0",
        "mapping_file.json 000000000002: image_path '../outside.jpg' must be a relative path inside the data set",
        "mapping_file.json 000000000003: no 'image_path'"]
    assert select(data, ["1"], None) == select(data, ["change_object"], None) == [item]
    with pytest.raises(UsageError, match="--types: no items of type random \\(types here: change object\\)"):
        select(data, ["0"], None)
    with pytest.raises(UsageError, match="--images applies to the authors' CSV files"):
        open_dataset(tmp_path, images=tmp_path)


def test_the_authors_csv(tmp_path):
    csv = tmp_path / "editing_coco.csv"
    csv.write_text(",file_name,old_caption,edited_caption,blended_words\n"
                   "0,000001.jpg,a child on a bench,a lion on a bench,\"('child', 'lion')\"\n"
                   "1,000002.jpg,a cat,a dog,cat dog\n"
                   "2,000002.jpg,a cat,a fox,cat fox\n"
                   "3,000003.jpg,a cat,,cat dog\n"
                   "4,000004.jpg,a cat,a dog,\"('cat', 3)\"\n")
    with pytest.raises(UsageError, match="editing_coco.csv: give the folder of its images with --images"):
        open_dataset(csv)
    data = open_dataset(csv, images=tmp_path)
    assert data.kind == "authors" and data.square
    assert [(item.id, item.source, item.target, item.blend) for item in data.items] == [
        ("000001", "a child on a bench", "a lion on a bench", (("child",), ("lion",))),
        ("000002-3", "a cat", "a dog", (("cat",), ("dog",))),
        ("000002-4", "a cat", "a fox", (("cat",), ("fox",)))]
    assert data.items[0].image == tmp_path / "000001.jpg" and data.items[0].mask() is None
    assert data.problems == ["editing_coco.csv line 5: an empty caption",
                             "editing_coco.csv line 6: blended_words \"('cat', 3)\" is not a tuple of words"]
    (tmp_path / "bad.csv").write_text("file_name,caption\nx.jpg,a cat\n")
    with pytest.raises(InputError, match="bad.csv: no column old_caption, edited_caption, blended_words"):
        open_dataset(tmp_path / "bad.csv", images=tmp_path)


def test_a_folder_with_metadata(tmp_path):
    picture(tmp_path / "images" / "a.png")
    Image.new("L", (8, 8), 255).save(tmp_path / "mask.png")
    palettes = {"colours": {"red": [220, 30, 30]}}
    rows = [{"file_name": "images/a.png", "source": "a red circle", "target": "a blue circle", "type": "colour",
             "mask": "mask.png", "mask_words": "red:blue", "target_image": "images/a.png", "palettes": palettes,
             "checks": [{"name": "success", "kind": "colour", "region": "mask.png", "palette": "colours",
                         "expect": "red"}]},
            {"file_name": "images/a.png", "source": "a red circle", "target": "a red square", "caption": "x"},
            {"file_name": "../elsewhere.png", "source": "s", "target": "t"},
            {"file_name": "b.png", "source": "s", "target": "t", "palettes": palettes,
             "checks": [{"name": "success", "kind": "colour", "region": "m.png", "palette": "colours",
                         "expect": "green"}]},
            {"id": "second", "file_name": "images/a.png", "source": "a red circle", "target": "a red square"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n\nnot json\n")
    data = open_dataset(tmp_path)
    assert data.kind == "folder"
    first, second = data.items
    assert (first.id, first.kind, first.blend, first.target_image) == ("a", "colour", (("red",), ("blue",)),
                                                                        tmp_path / "images" / "a.png")
    assert first.mask().shape == (8, 8) and first.checks[0].expect == "red" and first.edit_name == "images/a.png"
    assert (second.id, second.edit_name, second.mask()) == ("second", "images/second.png", None)
    assert data.problems[:3] == [
        "metadata.jsonl line 2: caption: Extra inputs are not permitted",
        "metadata.jsonl line 3: file_name '../elsewhere.png' must be a relative path inside the data set",
        "metadata.jsonl line 4: check success: no colour 'green' in a palette 'colours'"]
    assert data.problems[3].startswith("metadata.jsonl line 7: the line: Invalid JSON")


def test_something_else_is_not_a_data_set(tmp_path):
    with pytest.raises(UsageError, match="not a data set: expected a PIE-Bench folder"):
        open_dataset(tmp_path)
