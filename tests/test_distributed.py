"""Beyond one process: a planned batch split over `torchrun` processes (icd.app.distributed), and both training
stages under `accelerate launch --multi_gpu --num_processes 2` on the CPU (gloo), compared with one process of
the doubled batch, and resumed from the two-process checkpoint.

Why `--multi_gpu` on a CPU machine: `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate's
multi-CPU launch goes through mpirun), while `--multi_gpu` starts them through torchrun on any machine; the
training loop then joins them over gloo (icd_train.loop.cpu_processes).

Tolerance. Two processes of batch 2 see the same images and random draws as one process of batch 4 (the same
sampler order, draws made for the global batch), but the all-reduced mean of two half-batch gradients and the
VAE/UNet on half batches round differently in float32, and Adam's first steps (about lr x sign of the gradient)
amplify the rounding of near-zero gradients. Measured on this machine, the gap between the two runs' weights:
guidance 1.0e-4 of the change from the base UNet; icd 2.1e-4 / 5.9e-4 (forward / reverse LoRA) of what the last
two of its four steps moved. The same guidance run with each process drawing its own noise (the seeding before
this test) ends 1.3 apart: the tests allow 2e-3.
"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from bench.miniature.world import write_imagefolder
from icd.app.distributed import Launch, current_launch, local_device, merge_json_log, process_share
from icd.app.cli.train import train
from icd.errors import UsageError

RESOLUTION = 64
TOLERANCE = 2e-3  # of the change training made; see the module docstring
COMMON = (f"data.resolution={RESOLUTION}", "data.workers=0", "train.gradient_checkpointing=false",
          "train.eval_samples=0", "train.log_every=1", "train.lr=1e-3")
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def settings_args(settings) -> list[str]:
    return [part for setting in settings for part in ("--set", setting)]


def train_two_processes(stage: str, output, settings, resume: bool = False) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 -m icd train STAGE` (the README's command) on the CPU."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "icd", "train", stage, "-o", str(output),
               *settings_args(settings), *(["--resume"] if resume else [])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def train_one_process(stage: str, output, settings) -> None:
    result = CliRunner().invoke(train, [stage, "-o", str(output), *settings_args(settings)], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def logged_steps(output) -> list[dict]:
    return [json.loads(line) for line in (output / "logs" / "metrics.jsonl").read_text().splitlines()]


def relative_gap(got: dict, expected: dict, start: dict) -> float:
    """|got - expected| over |expected - start|: how far apart two runs ended, per unit of what training moved."""
    gap = sum(float(((got[key] - expected[key]) ** 2).sum()) for key in expected) ** 0.5
    moved = sum(float(((expected[key] - start[key]) ** 2).sum()) for key in expected) ** 0.5
    assert moved > 0
    return gap / moved


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("data"), range(8), RESOLUTION).parent


@pytest.fixture
def lone(monkeypatch):
    """No launcher variables: a process of its own."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# --- the batch split -------------------------------------------------------------------------------------


def test_two_torchrun_processes_split_the_batch_and_merge_one_json_log(tmp_path):
    worker = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              str(Path(__file__).parent / "fixtures" / "split_worker.py"), str(tmp_path)]
    result = subprocess.run(worker, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [part["launch"] for part in seen] == [[0, 2, 0], [1, 2, 1]]
    shares = [part["share"] for part in seen]
    items = [f"scene-{number}.png" for number in range(7)]
    assert sorted(shares[0] + shares[1]) == sorted(items) and not set(shares[0]) & set(shares[1])
    assert shares == [items[0::2], items[1::2]]  # round-robin
    assert [part["device"] for part in seen] == ["auto", "auto"]  # no CUDA here: the device is kept
    merged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(record["input"], record["rank"]) for record in merged] == [(item, 0) for item in shares[0]] + \
        [(item, 1) for item in shares[1]]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["log.jsonl", "rank0.json", "rank1.json"]


def test_icd_edit_under_torchrun_splits_the_folder_and_writes_one_log(tmp_path):
    from bench.miniature.world import DEMO_SCENE, DEMO_TARGET, render

    (tmp_path / "in").mkdir()
    for number in range(4):
        render(DEMO_SCENE, RESOLUTION).image.convert("RGB").save(tmp_path / "in" / f"s{number}.png")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "icd",
               "edit", "in", "--src", DEMO_SCENE.caption, "--tgt", DEMO_TARGET.caption, "-m", "mini", "--device",
               "cpu", "--no-server", "-q", "-o", "out", "--json-log", "log.jsonl"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [f"s{n}-edit.png" for n in range(4)]
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(record["input"], record["rank"], record["status"]) for record in records] == [
        ("in/s0.png", 0, "ok"), ("in/s2.png", 0, "ok"), ("in/s1.png", 1, "ok"), ("in/s3.png", 1, "ok")]


def test_a_lone_process_keeps_the_whole_batch_its_device_and_writes_its_log(lone, tmp_path):
    assert current_launch() == Launch(0, 1, 0)
    assert process_share(list("abcde")) == list("abcde")
    assert local_device("auto") == "auto" and local_device("cuda") == "cuda"
    log = tmp_path / "log.jsonl"
    log.write_text("stale\n")
    merge_json_log(log, [{"input": "a", "status": "ok"}])  # replaces an older log
    assert log.read_text() == '{"input": "a", "status": "ok"}\n'
    assert [path.name for path in tmp_path.iterdir()] == ["log.jsonl"]


def test_each_rank_takes_every_nth_item(lone):
    lone.setenv("WORLD_SIZE", "3")
    shares = []
    for rank in range(3):
        lone.setenv("RANK", str(rank))
        shares.append(process_share(list(range(8))))
    assert shares == [[0, 3, 6], [1, 4, 7], [2, 5]]


def test_several_processes_get_their_node_gpu_only_for_auto_and_bare_cuda(lone):
    lone.setenv("WORLD_SIZE", "4")
    lone.setenv("RANK", "3")
    lone.setenv("LOCAL_RANK", "3")
    lone.setattr(torch.cuda, "is_available", lambda: True)
    lone.setattr(torch.cuda, "device_count", lambda: 2)
    assert [local_device(name) for name in ("auto", "cuda", "cuda:0", "cpu")] == ["cuda:1", "cuda:1", "cuda:0", "cpu"]
    lone.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device("auto") == "auto"


@pytest.mark.parametrize("variables, message", [
    ({"WORLD_SIZE": "two"}, r"WORLD_SIZE='two': expected a whole number >= 0"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, r"RANK='-1': expected a whole number >= 0"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, r"RANK=2 and WORLD_SIZE=2: the rank must be below the number of processes"),
    ({"WORLD_SIZE": "0"}, r"RANK=0 and WORLD_SIZE=0: the rank must be below"),
])
def test_a_broken_launch_environment_is_one_line(lone, variables, message):
    for name, value in variables.items():
        lone.setenv(name, value)
    with pytest.raises(UsageError, match=message):
        process_share([1, 2])


def test_merging_without_a_launcher_address_is_one_line(lone, tmp_path):
    lone.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="MASTER_ADDR is not set: several processes .* torchrun or accelerate"):
        merge_json_log(tmp_path / "log.jsonl", [])
    assert not list(tmp_path.iterdir())


# --- training ------------------------------------------------------------------------------------------------


def test_guidance_in_two_processes_equals_one_with_the_doubled_batch(icd_home, data, tmp_path):
    tiny = icd_home / "models" / "tiny"
    settings = (f"model.path={tiny}", f"data.path={data}", *COMMON, "train.max_steps=3")
    train_two_processes("guidance", tmp_path / "two", (*settings, "train.batch_size=2"))
    train_one_process("guidance", tmp_path / "one", (*settings, "train.batch_size=4"))
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step-0000003").iterdir() if "random" in p.name) \
        == ["random_states_0.pkl", "random_states_1.pkl"]  # one run of two processes, not two lone runs
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(tiny / "base", subfolder="unet").state_dict()
    two, one = (torch.load(tmp_path / name / "teacher.pt") for name in ("two", "one"))
    start = {key: base.get(key, torch.zeros_like(value)) for key, value in one.items()}  # cond_proj starts at 0
    assert relative_gap(two, one, start) < TOLERANCE
    two_log, one_log = logged_steps(tmp_path / "two"), logged_steps(tmp_path / "one")
    assert [line["step"] for line in two_log] == [1, 2, 3]
    assert [line["train/loss"] for line in two_log] == pytest.approx([line["train/loss"] for line in one_log], rel=1e-4)


def test_icd_in_two_processes_resumes_and_equals_one_with_the_doubled_batch(icd_home, data, tmp_path):
    """Two steps in two processes, --resume to four, against four straight in one process of the doubled batch."""
    settings = (f"model.path={icd_home / 'models' / 'tiny'}", f"data.path={data}", *COMMON, "lora.rank=4",
                "train.checkpoint_every=2")
    two, one = tmp_path / "two", tmp_path / "one"
    train_two_processes("icd", two, (*settings, "train.batch_size=2", "train.max_steps=2"))
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-0000002"]
    assert {p.name for p in (two / "checkpoints" / "step-0000002").iterdir()} == {
        "forward.safetensors", "reverse.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl",
        "random_states_0.pkl", "random_states_1.pkl"}
    resumed = train_two_processes("icd", two, (*settings, "train.batch_size=2", "train.max_steps=4"), resume=True)
    assert resumed.stderr.count("resumed from") == 2 and "at step 2" in resumed.stderr
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    train_one_process("icd", one, (*settings, "train.batch_size=4", "train.max_steps=4"))
    for direction in ("forward", "reverse"):
        got, expected, halfway = (load_file(str(file)) for file in (
            two / f"{direction}.safetensors", one / f"{direction}.safetensors",
            one / "checkpoints" / "step-0000002" / f"{direction}.safetensors"))
        assert got.keys() == expected.keys()
        assert relative_gap(got, expected, halfway) < TOLERANCE  # of what the last two steps moved
    two_log, one_log = logged_steps(two), logged_steps(one)
    assert [line["step"] for line in two_log] == [1, 2, 3, 4]
    for got, expected in zip(two_log, one_log):
        assert got.keys() == expected.keys()
        assert [got[key] for key in expected] == pytest.approx(list(expected.values()), rel=1e-4)
