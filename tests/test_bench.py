"""`icd bench` on tiny models: the report's fields and values, the FLOP counts, and --random-weights (with the
real configs swapped for tiny ones) including the cold start of a new process."""

import json
import statistics
import types

import pytest
import torch
from click.testing import CliRunner
from torch.nn.attention import SDPBackend, sdpa_kernel

from icd.app import bench as bench_module
from icd.app.bench import stage_flops, time_ms
from icd.app.cli import main
from icd.app.session import open_session
from icd.models import offline
from icd.models.hub import resolve_model

STAGES = {"text_encode", "vae_encode", "unet_forward_b1", "unet_reverse_b1", "unet_reverse_b2", "vae_decode"}
END_TO_END = {"invert", "edit_p2p", "edit_swap", "photo_edit_p2p", "photo_edit_swap"}
TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 hidden_act="quick_gelu", projection_dim=32, vocab_size=100, max_position_embeddings=77)
TINY_RESOLUTION = 64
TINY_SD15 = {
    "unet": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, cross_attention_dim=32,
                 sample_size=8, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "vae": dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    "text_encoders": [TINY_CLIP],
}


def bench(*args):
    result = CliRunner().invoke(main, ["bench", "--json", "--repeats", "2", "--warmup", "1", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_report_on_tiny(icd_home):
    report = bench("-m", "tiny", "--size", "64", "--batch", "1", "--batch", "2", "--backend", "torch",
                   "--no-cold-start")
    assert (report["model"], report["kind"], report["backend"], report["dtype"]) == ("tiny-sd15", "sd15", "torch", "fp32")
    assert report["size"] == [64, 64] and report["repeats"] == 2 and "cold_start_s" not in report
    assert set(report["stages"]) == STAGES and set(report["end_to_end"]) == END_TO_END
    assert report["matmul_tflops"] > 0 and report["load_s"] > 0
    for row in [*report["stages"].values(), *report["end_to_end"].values()]:
        assert row["ms"] > 0 and row["gflop"] > 0
        assert row["floor_ms"] == pytest.approx(row["gflop"] / report["matmul_tflops"])  # GFLOP / (TFLOP/s) = ms
    stages, e2e = report["stages"], report["end_to_end"]
    assert stages["unet_reverse_b2"]["gflop"] == pytest.approx(2 * stages["unet_reverse_b1"]["gflop"])
    assert e2e["photo_edit_p2p"]["gflop"] == pytest.approx(e2e["invert"]["gflop"] + e2e["edit_p2p"]["gflop"])
    # a p2p edit decodes two rows with four UNet calls each
    assert e2e["edit_p2p"]["gflop"] > 8 * stages["unet_reverse_b1"]["gflop"]
    assert set(report["throughput"]) == {"1", "2"}
    for batch, row in report["throughput"].items():
        assert row["images_per_s"] == pytest.approx(int(batch) / row["ms"] * 1000)


def test_flops_are_counted_on_meta_copies(icd_home):
    """The count on meta modules equals a real run's with the attention decomposed into countable matmuls."""
    session = open_session(resolve_model("tiny"), "cpu", "fp32", "torch")
    model = session.model
    counted = stage_flops(model, 96, 64)
    denoiser = session.denoiser("reverse")
    cond = model.encode_text(["a cat"], (96, 64))
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as real, sdpa_kernel(SDPBackend.MATH):
        denoiser(torch.zeros(1, 4, 8, 12), 999, cond, torch.zeros(1))
    assert counted["unet"] == real.get_total_flops() > 0
    assert stage_flops(model, 192, 128)["vae_decode"] == pytest.approx(4 * counted["vae_decode"], rel=0.05)


def fake_clock(durations_s: list[float]):
    """A perf_counter that stands still except when the returned function runs, which takes the next duration."""
    clock = types.SimpleNamespace(now=0.0)
    clock.perf_counter = lambda: clock.now
    steps = iter(durations_s)

    def run():
        clock.now += next(steps)

    return clock, run, steps


def test_time_ms_is_a_median(monkeypatch):
    calls = []
    assert time_ms(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=3) < 50
    assert len(calls) == 5
    # Timings whose median, mean, minimum, maximum, first, last and middle (unsorted) all differ, so only the
    # median passes; the warm-ups take 1000 s each, so timing them shows too.
    durations_ms = [4.0, 30.0, 2.0, 7.0, 1.0, 5.0, 6.0]
    assert len({statistics.median(durations_ms), statistics.mean(durations_ms), min(durations_ms),
                max(durations_ms), durations_ms[0], durations_ms[-1], durations_ms[3]}) == 7
    for best, expected in ((False, 5.0), (True, 1.0)):
        clock, run, steps = fake_clock([1000.0, 1000.0] + [ms / 1000 for ms in durations_ms])
        monkeypatch.setattr(bench_module, "time", clock)  # the bench module's clock only
        assert time_ms(run, torch.device("cpu"), warmup=2, repeats=7, best=best) == pytest.approx(expected)
        assert next(steps, None) is None  # 2 warm-ups + 7 timed runs, no more


def test_random_weights_with_cold_start(icd_home, monkeypatch):
    monkeypatch.setitem(offline.CONFIGS, "sd15", TINY_SD15)
    monkeypatch.setitem(offline.RESOLUTION, "sd15", TINY_RESOLUTION)  # the model's own, written in its icd.json
    report = bench("--random-weights", "sd15", "--batch", "1")  # at the model's own resolution
    folder = icd_home / "models" / "random-sd15"
    assert report["model"] == "random-sd15" and (folder / "icd.json").is_file()
    assert report["size"] == [TINY_RESOLUTION] * 2
    assert 0 < report["load_s"] < report["cold_start_s"] < 60
    assert report["backend"] == "torch"  # auto: fused weights exported for the cold start, no graphs
    model = open_session(resolve_model(str(folder)), "cpu", "fp32", "torch").model
    assert model.unet_config["cross_attention_dim"] == 32 and model.unet_config["time_cond_proj_dim"] == 512
    assert bench("--random-weights", "sd15", "--size", "64", "--batch", "1", "--no-cold-start")["fingerprint"] == \
        report["fingerprint"]  # built once
