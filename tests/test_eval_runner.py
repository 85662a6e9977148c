"""`icd eval` end to end on `mini`: one inversion per photo for a whole sweep, resuming an interrupted run,
refusing another run's folder, a bad item failing alone, the baseline, the command's files, a running server
and two torchrun processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icd.app.evaluate import EvalRun, resolve_settings, run_evaluation
from icd.app.requests import Edit, Invert
from icd.app.runner import LocalRunner
from icd.app.session import open_session
from icd.errors import UsageError
from icd.evaluation.datasets import open_dataset
from icd.evaluation.metrics import Evaluator
from icd.models.hub import resolve_model
from tests.fixtures.cli import icd

sys.path.insert(0, str(Path(__file__).parents[1] / "bench" / "miniature"))
from edit_sets import write_sets  # noqa: E402

MINI = ("-m", "mini", "--device", "cpu", "--no-server")


@pytest.fixture(scope="module")
def mini_set(tmp_path_factory) -> Path:
    """Two held-out two-object scenes of the miniature world, written as the bench writes its set."""
    root = tmp_path_factory.mktemp("mini-sets")
    write_sets(root, 2, ["two-objects"])
    return root / "two-objects"


@pytest.fixture(scope="module")
def mini_runner():
    return LocalRunner(open_session("mini", "cpu", "fp32", "torch"))


class Counting:
    """A runner that counts inversions and edits, and is interrupted at the `stop_at`-th edit (Ctrl-C)."""

    def __init__(self, runner, stop_at: int | None = None):
        self.runner, self.stop_at, self.inversions, self.edits = runner, stop_at, 0, 0

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def run(self, request):
        if isinstance(request, Invert):
            self.inversions += 1
        elif isinstance(request, Edit):
            self.edits += 1
            if self.edits == self.stop_at:
                raise KeyboardInterrupt
        return self.runner.run(request)


def evaluation(folder: Path, out: Path, runner, sweeps: dict, metrics=("checks",), seed: int = 0) -> EvalRun:
    dataset = open_dataset(folder)
    manifest = resolve_model("mini")
    settings = resolve_settings(manifest, {}, sweeps, ["icd"], None)
    return EvalRun(dataset, dataset.items, settings, out, "mini", manifest, Evaluator(list(metrics)),
                   lambda solver: runner, seed=seed, quiet=True)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_a_sweep_inverts_each_photo_once(mini_set, mini_runner, tmp_path):
    runner = Counting(mini_runner)
    run = evaluation(mini_set, tmp_path / "out", runner, {"method": ["p2p", "none"], "mask_use": ["none", "mask"]})
    assert len(run.settings) == 4
    assert run_evaluation(run) == 0
    assert (runner.inversions, runner.edits) == (2, 8)
    found = records(tmp_path / "out")
    assert len(found) == 8 and {r["setting"] for r in found} == {s.label for s in run.settings}
    masked = next(r for r in found if r["settings"]["mask_use"] == "mask" and r["settings"]["method"] == "none")
    assert masked["settings"]["applied"] == {"mask": True, "blend": None} and masked["settings"]["keep_outside"]
    assert masked["metrics"]["psnr_other"] > 35  # the other object is outside the mask: the photo's own pixels
    assert masked["unet_calls"] == 8 and masked["seconds"] >= masked["invert_seconds"] > 0
    assert Path(tmp_path / "out" / masked["edit"]).is_file()


def test_an_interrupted_run_continues_where_it_stopped(mini_set, mini_runner, tmp_path):
    out, sweeps = tmp_path / "out", {"mask_use": ["none", "mask"]}
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(evaluation(mini_set, out, Counting(mini_runner, stop_at=3), sweeps))
    assert len(records(out)) == 2  # the first photo's two settings
    with open(out / "results.jsonl", "a") as results:
        results.write('{"id": "10000')  # a record cut short by the kill
    runner = Counting(mini_runner)
    assert run_evaluation(evaluation(mini_set, out, runner, sweeps)) == 0
    assert (runner.inversions, runner.edits) == (1, 2)
    assert len(records(out)) == 4 and (out / "summary.md").is_file()
    again = Counting(mini_runner)
    run_evaluation(evaluation(mini_set, out, again, sweeps, metrics=("checks", "psnr")))
    assert again.edits == 0  # a metric asked for later is measured on the edits that are there
    assert all(record["metrics"]["psnr"] > 10 for record in records(out))


def test_another_run_into_the_same_folder_is_refused(mini_set, mini_runner, tmp_path):
    out = tmp_path / "out"
    run_evaluation(evaluation(mini_set, out, mini_runner, {}, seed=0))
    with pytest.raises(UsageError, match="holds an evaluation with another seed \\(0, not 3\\): choose another -o"):
        run_evaluation(evaluation(mini_set, out, mini_runner, {}, seed=3))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="is not empty and holds no `icd eval` run"):
        run_evaluation(evaluation(mini_set, tmp_path / "mine", mini_runner, {}))


def test_p2p_options_without_p2p_are_refused():
    manifest = resolve_model("mini")
    with pytest.raises(UsageError, match="^--amplify apply to --method p2p, not swap$"):
        resolve_settings(manifest, {"method": "swap"}, {}, ["icd"], {"bear": 4.0})
    with pytest.raises(UsageError, match="^--cross-replace apply to --method p2p, not none$"):
        resolve_settings(manifest, {"cross_replace": 0.5}, {"method": ["p2p", "none"]}, ["icd"], None)
    amplified = resolve_settings(manifest, {}, {}, ["icd"], {"bear": 4.0, "ant": 2.0})
    assert amplified[0].label == "icd-p2p-w2-tau0.8-cross0.3-self0.6-ampant2+bear4"


def test_a_bad_item_fails_alone(mini_set, mini_runner, tmp_path, capsys):
    folder = tmp_path / "set"
    folder.mkdir()
    rows = mini_set.joinpath("metadata.jsonl").read_text().splitlines()
    broken = json.loads(rows[0]) | {"id": "broken", "file_name": "missing.png", "mask": None, "mask_words": None,
                                    "target_image": None, "checks": []}
    for part in ("images", "regions", "masks", "targets"):
        (folder / part).symlink_to(mini_set / part)
    (folder / "metadata.jsonl").write_text("\n".join([json.dumps({k: v for k, v in broken.items() if v is not None}),
                                                      rows[1]]) + "\n")
    assert run_evaluation(evaluation(folder, tmp_path / "out", mini_runner, {})) == 1
    assert "icd: error: broken: missing.png: no such file" in capsys.readouterr().err
    assert [record["id"] for record in records(tmp_path / "out")] == [json.loads(rows[1])["id"]]


def pie_bench(folder: Path, scene: Path) -> Path:
    """A one-item PIE-Bench folder: a 64x64 scene, its mask run-length encoded over 512x512 (the left half)."""
    image = folder / "annotation_images" / "1_change_object_80" / "000000000007.png"
    image.parent.mkdir(parents=True)
    Image.open(scene).save(image)
    runs = [value for row in range(512) for value in (row * 512, 256)]
    (folder / "mapping_file.json").write_text(json.dumps({"000000000007": {
        "image_path": "1_change_object_80/000000000007.png", "original_prompt": "a red circle on a sandy background",
        "editing_prompt": "a [blue] circle on a sandy background", "editing_type_id": "1",
        "blended_word": "red blue", "mask": runs}}))
    return folder


def test_the_command_end_to_end(mini_set, tmp_path):
    args = ("eval", mini_set, *MINI, "-o", tmp_path / "out", "--metrics", "checks,psnr", "--sweep", "mask_use=none,mask",
            "--baseline", "ddim", "--steps", "5", "--plot", "success:psnr_other")
    result = icd(*args, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    found = records(tmp_path / "out")
    assert len(found) == 8 and {r["unet_calls"] for r in found} == {8, 9}  # iCD 4 + 4; DDIM 4 + 5 on 5 steps
    assert {r["settings"]["solver"] for r in found} == {"icd", "ddim5"}
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| solver | mask_use | keep_outside | n | PSNR ↑ | PSNR to target ↑ | success ↑ | other_kept ↑ |" in summary
    assert "| ddim5 | mask | True | 2 |" in summary and summary in result.output
    for name in ("tradeoff.png", "contact_sheet.png"):
        assert Image.open(tmp_path / "out" / name).format == "PNG"
    edits = sorted((tmp_path / "out" / "edits").rglob("*.png"))
    stamps = [path.stat().st_mtime_ns for path in edits]
    again = icd(*args, cwd=tmp_path)
    assert again.exit_code == 0 and [path.stat().st_mtime_ns for path in edits] == stamps
    other = icd(*args, "--seed", "1", cwd=tmp_path)
    assert other.exit_code == 2 and "holds an evaluation with another seed (0, not 1)" in other.output


def test_pie_bench_masks_reach_the_edit(mini_set, tmp_path):
    data = pie_bench(tmp_path / "pie", next((mini_set / "images").iterdir()))
    result = icd("eval", data, *MINI, "-o", tmp_path / "out", "--metrics", "psnr,mse", "--mask-use", "mask",
                 cwd=tmp_path)
    assert result.exit_code == 0, result.output
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "1_change_object_80" / "000000000007.png"))
    assert mask.shape == (512, 512) and mask[1:-1, 1:256].all() and not mask[1:-1, 256:-1].any()
    (record,) = records(tmp_path / "out")
    # the right half is the photo's own pixels (kept outside the mask), but for the benchmark's border
    assert record["metrics"]["psnr"] > 45 and record["metrics"]["mse"] < 0.5
    assert record["target"] == "a blue circle on a sandy background" and record["type"] == "change object"


def test_a_running_server_makes_the_edits(icd_home, tmp_path):
    """Warm through `icd serve`: the same edits as in this process, bit for bit."""
    from tests.test_serve import Served, photo

    photo(tmp_path / "set" / "a.png")
    (tmp_path / "set" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "source": "a red cat", "target": "a blue cat"}) + "\n")
    args = ("eval", tmp_path / "set", "-m", "tiny", "--device", "cpu", "--metrics", "psnr", "--method", "none")
    server = Served()
    try:
        served = icd(*args, "-o", tmp_path / "served", cwd=tmp_path)
    finally:
        server.close()
    here = icd(*args, "-o", tmp_path / "here", "--no-server", cwd=tmp_path)
    assert served.exit_code == here.exit_code == 0, served.output
    assert f"icd: info: using the server at {server.path}" in served.stderr
    assert "using the server" not in here.stderr
    edits = [next((tmp_path / out / "edits").rglob("a.png")).read_bytes() for out in ("served", "here")]
    assert edits[0] == edits[1]


def test_two_torchrun_processes_share_the_items_and_write_one_result(mini_set, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "icd",
               "eval", str(mini_set), *MINI, "-o", "out", "--metrics", "checks", "--sweep", "mask_use=none,mask"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    found = records(tmp_path / "out")
    assert sorted((r["id"], r["settings"]["mask_use"]) for r in found) == sorted(
        (json.loads(row)["id"], use) for row in (mini_set / "metadata.jsonl").read_text().splitlines()
        for use in ("none", "mask"))
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [  # no results.rank-N.jsonl left
        "contact_sheet.png", "edits", "results.jsonl", "run.json", "summary.json", "summary.md"]
    assert result.stdout.count("# icd eval:") == 1  # the first process prints the table


def test_a_later_process_writes_nothing_until_the_first_has_claimed_the_folder(tmp_path, monkeypatch):
    """Under torchrun, rank 1 waits for rank 0's run.json (not there: the folder is not even made), then takes
    the run as its own; a claim that never comes ends it with one line."""
    import threading
    from datetime import timedelta

    from icd.app import evaluate

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    out, about = tmp_path / "out", {"dataset": "set", "model": "mini"}
    seen = []

    def first_process():
        seen.append(out.exists())  # what rank 1 had made before the claim
        out.mkdir()
        (out / evaluate.RUN_FILE).write_text(json.dumps(about))

    timer = threading.Timer(0.3, first_process)
    timer.start()
    evaluate.claim_output(out, about)
    assert (out / evaluate.RUN_FILE).is_file()  # returned only once claimed
    timer.join()
    assert seen == [False] and sorted(p.name for p in out.iterdir()) == [evaluate.RUN_FILE]
    with pytest.raises(evaluate.ICDError, match=r"the first process did not claim .*other within 0:00:00.2"):
        evaluate._await_claim(tmp_path / "other" / evaluate.RUN_FILE, timedelta(seconds=0.2))
