"""Backends on the tiny model: selection and fallbacks (the registry chooses, the session announces and runs
the export), the ONNX Runtime denoiser against PyTorch, the pipeline on it (Prompt-to-Prompt included, on
its own graph), torch.compile, the CLI options, and TensorRT's cache key."""

import importlib.util
import inspect
import json
import logging
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("onnxruntime", reason="the onnx extra (pip install -e '.[onnx]') is not installed")

from icd import pipeline
from icd.editing import edit_plan  # noqa: E402
from icd.app import session as session_module  # noqa: E402
from icd.app.cli import main  # noqa: E402
from icd.app.session import open_session  # noqa: E402
from icd.core.consistency import add_noise, consistency_jump  # noqa: E402
from icd.core.denoiser import Guided  # noqa: E402
from icd.errors import ICDError  # noqa: E402
from icd.models.hub import resolve_model  # noqa: E402
from icd.models.manifest import load_manifest  # noqa: E402
from icd_export import build, tensorrt  # noqa: E402
from icd_export.artifacts import Index  # noqa: E402
from icd_export.compiled import choose_compile_mode  # noqa: E402
from icd_export.onnx import OnnxEps, OnnxSteered  # noqa: E402
from icd_export.registry import Choice, choose_backend  # noqa: E402

CPU, FP32 = torch.device("cpu"), torch.float32


@pytest.fixture(scope="module")
def manifest(icd_home):
    return resolve_model("tiny")


def icd_messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "icd"]


@pytest.fixture(scope="module")
def models(manifest):
    """Sessions of the tiny model on torch and on ONNX Runtime (which exports its graphs when first asked)."""
    return {backend: open_session(manifest, "cpu", "fp32", backend) for backend in ("torch", "onnx")}


AUTO_TORCH = Choice("torch", reason="auto: no ONNX graphs or engines for this model yet; `icd export` makes them")
AUTO_ONNX = Choice("onnx", reason="auto: the fastest with artifacts for this model")


@pytest.fixture
def new_process(monkeypatch):
    """Sessions are opened once per process: forget them, as a new `icd` process would not have them."""
    monkeypatch.setattr(session_module, "_OPEN", {})


@pytest.fixture
def exports(monkeypatch):
    """The manifests that the session had exported (the real export still runs)."""
    done, real_export = [], build.export_model

    def recorded(manifest, *args, **kwargs):
        done.append(manifest.name)
        return real_export(manifest, *args, **kwargs)

    monkeypatch.setattr(build, "export_model", recorded)
    return done


def test_auto_is_torch_until_exported_then_onnx(icd_home, caplog, new_process, exports):
    """The registry only chooses (and says whether the engine's files are missing); the session says what
    it chose and why, and builds a named engine's files once, announcing it."""
    manifest = resolve_model("tiny-sdxl")
    assert choose_backend("auto", manifest, CPU, FP32) == AUTO_TORCH
    assert choose_backend("onnx", manifest, CPU, FP32) == Choice("onnx", needs_export=True)
    assert choose_backend("torch", manifest, CPU, FP32) == Choice("torch")
    assert exports == [] and not Index.open(manifest).entries  # choosing built nothing
    with caplog.at_level(logging.INFO, logger="icd"):
        assert open_session(manifest, "cpu", "fp32", "auto").engine.name == "torch"
    assert icd_messages(caplog) == ["backend: torch (auto: no ONNX graphs or engines for this model yet; "
                                    "`icd export` makes them)"]
    assert exports == []
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="icd"):
        assert open_session(manifest, "cpu", "fp32", "onnx").engine.name == "onnx"
    assert icd_messages(caplog)[0] == ("no onnx artifacts for model 'tiny-sdxl' yet: building them once "
                                       "(`icd export` does it ahead)")
    assert exports == ["tiny-sdxl"]
    assert choose_backend("onnx", manifest, CPU, FP32) == Choice("onnx")
    assert choose_backend("auto", manifest, CPU, FP32) == AUTO_ONNX
    session_module._OPEN.clear()  # a new process: the graphs are there, nothing is built again
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="icd"):
        assert open_session(manifest, "cpu", "fp32", "onnx").engine.name == "onnx"
        assert open_session(manifest, "cpu", "fp32", "auto").engine.name == "onnx"
    assert icd_messages(caplog) == ["backend: onnx (auto: the fastest with artifacts for this model)"]
    assert exports == ["tiny-sdxl"]
    # fp32 graphs do not serve bf16, and ONNX has no bf16 graphs at all
    assert choose_backend("auto", manifest, CPU, torch.bfloat16) == AUTO_TORCH
    with pytest.raises(ICDError, match="^--backend onnx: ONNX graphs are fp32 or fp16, not bf16$"):
        choose_backend("onnx", manifest, CPU, torch.bfloat16)


def test_missing_runtimes_fall_back_or_fail_in_one_line(manifest, models, monkeypatch):
    if importlib.util.find_spec("tensorrt") is None:
        expected = "TensorRT is not installed"
    else:
        expected = "TensorRT needs a CUDA GPU"
    with pytest.raises(ICDError, match=f"^--backend tensorrt: {expected}") as err:
        choose_backend("tensorrt", manifest, CPU, FP32)
    assert "\n" not in str(err.value)
    assert choose_backend("auto", manifest, CPU, FP32) == AUTO_ONNX  # graphs exported by `models`
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real_find_spec(name))
    assert choose_backend("auto", manifest, CPU, FP32) == AUTO_TORCH
    with pytest.raises(ICDError, match=r"^--backend onnx: onnxruntime is not installed \(pip install 'icd\[onnx\]'\)$"):
        choose_backend("onnx", manifest, CPU, FP32)


def test_onnx_denoiser_matches_torch(models):
    onnx_denoiser, torch_denoiser = models["onnx"].denoiser("reverse"), models["torch"].denoiser("reverse")
    # one guidance wrapper around either engine's epsilon function
    assert isinstance(onnx_denoiser, Guided) and isinstance(torch_denoiser, Guided)
    assert isinstance(onnx_denoiser.eps_fn, OnnxEps) and not isinstance(torch_denoiser.eps_fn, OnnxEps)
    assert models["onnx"].denoiser("reverse") is onnx_denoiser  # sessions are made once
    cond = models["torch"].model.encode_text(["a cat", "a dog"], (96, 64))
    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    for t, w in ((999, [0.0, 0.0]), (259, [0.0, 19.0])):
        expected = torch_denoiser(x, t, cond, torch.tensor(w))
        got = onnx_denoiser(x, t, cond, torch.tensor(w))
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert (got - expected).abs().max().item() < 2e-3 * expected.abs().max().item()


def test_pipeline_runs_on_onnx(models, caplog):
    """invert and reconstruct are the sampling loops over the ONNX denoisers (written out here). Whole
    chains are not compared with torch's: the tiny model's random weights amplify 1e-5 step differences."""
    session = models["onnx"]
    model = session.model
    pixels = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x_T = pipeline.invert(session, pixels, "a cat", seed=3)
    cond = model.encode_text(["a cat"], (96, 64))
    z0 = model.encode_image(pixels)
    x = add_noise(z0, torch.randn(z0.shape, generator=torch.Generator().manual_seed(3)), 19)
    for t, s in ((19, 259), (259, 519), (519, 779), (779, 999)):
        x = consistency_jump(x, session.denoiser("forward")(x, t, cond, torch.zeros(1)), t, s)
    assert torch.equal(x, x_T)
    for t, s in ((999, 779), (779, 519), (519, 259), (259, 0)):
        x = consistency_jump(x, session.denoiser("reverse")(x, t, cond, torch.zeros(1)), t, s)
    assert torch.equal(pipeline.reconstruct(session, x_T, "a cat"), model.decode_latents(x))
    with caplog.at_level(logging.INFO, logger="icd"):
        plan = edit_plan(session.manifest, "a cat", "a dog", method="p2p")
        p2p = [pipeline.edit(session, x_T, plan) for _ in range(2)]
    # Prompt-to-Prompt decodes on its own ONNX graph, silently, with torch's pixels (within one level)
    assert icd_messages(caplog) == []
    assert isinstance(session.attention_host().run, OnnxSteered)
    reference = pipeline.edit(models["torch"], x_T, edit_plan(models["torch"].manifest, "a cat", "a dog", method="p2p"))
    assert torch.equal(p2p[0].edited, p2p[1].edited)
    assert (p2p[0].edited - reference.edited).abs().max().item() <= 2 / 255


def test_cli_backend_option(icd_home, models, tmp_path):
    Image.effect_noise((80, 48), 64).convert("RGB").save(tmp_path / "photo.png")
    runner = CliRunner()
    args = ["edit", str(tmp_path / "photo.png"), "--src", "a cat", "--tgt", "a dog", "-m", "tiny", "--method", "swap",
            "-o", str(tmp_path / "out.png")]
    result = runner.invoke(main, args + ["--backend", "onnx"])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "out.png").size == (80, 48)
    result = runner.invoke(main, args + ["--backend", "tensorrt", "--overwrite"])
    assert result.exit_code == 1
    assert result.stderr.startswith("icd: error: --backend tensorrt: TensorRT ")
    assert len(result.stderr.strip().splitlines()) == 1
    result = runner.invoke(main, ["export", "-m", "tiny", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["folder"] == str(icd_home / "artifacts" / models["torch"].manifest.fingerprint)
    assert all(item["reused"] for item in report["artifacts"]) and len(report["artifacts"]) == 5
    result = runner.invoke(main, ["export", "-m", "tiny", "--tensorrt", "--size", "500x500"])
    assert result.exit_code == 2 and "is not WIDTHxHEIGHT in multiples of 8" in result.output
    if importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available():
        result = runner.invoke(main, ["export", "-m", "tiny", "--tensorrt"])
        assert result.exit_code == 1 and result.stderr.startswith("icd: error: --tensorrt: TensorRT ")
        assert len(result.stderr.strip().splitlines()) == 1


def test_engine_cache_key(manifest, models):
    index = Index.open(manifest)
    config = models["torch"].model.unet_config
    identity = {"tensorrt": "11.4.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    with pytest.raises(ICDError, match="no fp16 ONNX graph of the reverse UNet"):
        tensorrt.engine_key(index, "reverse", config, ((128, 128),), 2, identity)
    graph = index.entries["unet-reverse-fp32.onnx"]  # stands in for the fp16 graph: the key only reads the entry
    index.entries["unet-reverse-fp16.onnx"] = {**graph, "precision": "fp16"}
    key = tensorrt.engine_key(index, "reverse", config, ((128, 128), (64, 192)), 2, identity)
    assert key["graph_sha256"] == graph["sha256"] and key["precision"] == "fp16"
    # (min, opt, max) latents (height, width): 128x128 is the first size (opt), 64x192 the narrowest and tallest
    assert key["profile"]["sample"] == [[1, 4, 16, 8], [1, 4, 16, 16], [2, 4, 24, 16]]
    assert key["profile"]["timestep_cond"] == [[1, 512], [1, 512], [2, 512]]
    base = tensorrt.key_hash(key)
    assert base == tensorrt.key_hash(json.loads(json.dumps(key)))  # stable
    changes = [{"tensorrt": "10.16.0"}, {"gpu": "NVIDIA A100-SXM4-80GB"}, {"compute_capability": "8.0"},
               {"graph_sha256": "0" * 64}, {"precision": "fp32"}, {"optimization_level": 5},
               {"profile": tensorrt.profile_shapes(config, ((128, 128),), 4)}]
    assert len({base} | {tensorrt.key_hash({**key, **change}) for change in changes}) == len(changes) + 1
    assert tensorrt.timing_cache_path(identity).name == "timing-11.4.0-NVIDIA-H100-80GB-HBM3.cache"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
                    reason="TensorRT and a CUDA GPU are needed (neither is on the CPU development machines)")
def test_tensorrt_engine_matches_torch(manifest, tmp_path):
    # The tiny LoRAs overflow fp16: a copy of the model with them scaled down
    shutil.copytree(manifest.path.parent, tmp_path / "model")
    data = json.loads((tmp_path / "model" / "icd.json").read_text())
    (tmp_path / "model" / "icd.json").write_text(json.dumps({**data, "lora_alpha": 0.01}))
    fp16_safe = load_manifest(tmp_path / "model")
    trt_model = open_session(fp16_safe, "cuda", "fp16", "tensorrt")
    torch_model = open_session(fp16_safe, "cuda", "fp16", "torch")
    cond = torch_model.model.encode_text(["a cat"], (128, 128))
    x = torch.randn(1, 4, 16, 16, device="cuda")
    for _ in range(2):  # the second call replays the CUDA graph
        got = trt_model.denoiser("forward")(x, 259, cond, torch.zeros(1))
        expected = torch_model.denoiser("forward")(x, 259, cond, torch.zeros(1))
        assert torch.isfinite(got).all()
        assert (got.float() - expected.float()).abs().max().item() < 5e-2 * expected.abs().max().item()
    assert os.path.isfile(tensorrt.timing_cache_path(tensorrt.runtime_identity(tensorrt._tensorrt(), x.device)))


def test_compile_wraps_the_denoisers_and_prompt_to_prompt(manifest, caplog):
    session = open_session(str(manifest.path), "cpu", "fp32", "torch", compile=True, static_shapes=True,
                           directions=("reverse",))
    assert session.engine.compile_mode == "default"  # CUDA graphs and autotuning only on a GPU with fixed shapes
    assert choose_compile_mode(torch.device("cuda"), True) == "max-autotune"
    assert choose_compile_mode(torch.device("cuda"), True, loops_captured=True) == "max-autotune-no-cudagraphs"
    assert session.graphs is None  # loops are captured on CUDA only
    assert choose_compile_mode(torch.device("cuda"), False) == "default"
    # the denoiser's epsilon function runs a compiled copy (compiled lazily, on first call) of the eager UNet
    compiled = inspect.getclosurevars(session.denoiser("reverse").eps_fn).nonlocals["unet"]
    (eager,) = session.engine.unets(session.model, "reverse")
    assert type(compiled).__name__ == "OptimizedModule" and compiled._orig_mod is eager
    with caplog.at_level(logging.INFO, logger="icd"):
        host = session.attention_host()
    # P2P runs a compiled copy of the steered module over the same eager UNet, said nothing about
    module = inspect.getclosurevars(host.run).nonlocals["module"]
    assert type(module).__name__ == "OptimizedModule" and module._orig_mod.unet is eager
    assert icd_messages(caplog) == []


def test_no_wasted_work_in_the_loop(models):
    """A p2p edit need not decode the source row; e(w) is made once per guidance row values, not per step."""
    session = models["torch"]
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    plan = edit_plan(session.manifest, "a cat", "a dog", method="p2p")
    full = pipeline.edit(session, x_T, plan)
    lean = pipeline.edit(session, x_T, plan, with_reconstruction=False)
    assert lean.reconstruction is None and lean.edited.shape == full.edited.shape
    assert (lean.edited - full.edited).abs().max().item() < 1e-5
    denoiser = session.denoiser("reverse")
    first = denoiser.embedding(torch.tensor([0.0, 19.0]))
    assert denoiser.embedding(torch.tensor([0.0, 19.0])) is first
    assert not torch.equal(denoiser.embedding(torch.tensor([0.0, 7.0])), first)
