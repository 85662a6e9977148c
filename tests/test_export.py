"""`icd export` on the tiny models: ONNX graphs against PyTorch at sizes other than the export example,
fused weights that load without the teacher, and artifacts reused when valid, rebuilt when not."""

import json

import pytest
import torch

pytest.importorskip("onnxruntime", reason="the onnx extra (pip install -e '.[onnx]') is not installed")
onnx = pytest.importorskip("onnx", reason="the onnx extra (pip install -e '.[onnx]') is not installed")

from icd.app.session import Session  # noqa: E402
from icd.models import loading  # noqa: E402
from icd.models.hub import resolve_model  # noqa: E402
from icd.models.loading import Model, fuse_unets, load_teacher, unet_config  # noqa: E402
from icd_export import artifacts  # noqa: E402
from icd_export.artifacts import Index, artifacts_dir, load_fused_unet  # noqa: E402
from icd_export.build import export_model  # noqa: E402
from icd_export.onnx import (  # noqa: E402
    ExportError, UNetGraph, example_latent, export_unet, find_cpu_optimized, input_names, onnx_session, random_inputs,
    verify_graph)


def fused_fp32(manifest, *directions):
    """Fresh fp32 teacher + LoRA UNets on the CPU, never from the artifacts."""
    return fuse_unets(manifest, unet_config(manifest), directions)


def teacher_of(manifest):
    return load_teacher(manifest, unet_config(manifest))


def unets_session(manifest, dtype):
    """A session with the UNets only (no text encoders or VAE): what it loads is what a run would load."""
    return Session(Model(manifest, torch.device("cpu"), dtype, unet_config(manifest)))


@pytest.fixture(scope="module")
def fused(icd_home):
    """Both tiny models' fused reverse UNets (fp32, CPU)."""
    return {kind: fused_fp32(resolve_model(name), "reverse")[0]
            for kind, name in (("sd15", "tiny"), ("sdxl", "tiny-sdxl"))}


def run_both(path, unet, batch, latent, dtype=torch.float32):
    feeds = random_inputs(unet.config, batch, latent, torch.float32, seed=batch)
    with torch.inference_mode():
        reference = UNetGraph(unet)(*(feeds[name] for name in input_names(unet.config)))
    session = onnx_session(path, torch.device("cpu"))
    (out,) = session.run(["eps"], {k: (v if k == "timestep" else v.to(dtype)).numpy() for k, v in feeds.items()})
    return torch.from_numpy(out).float(), reference


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_graph_matches_pytorch_at_other_sizes(fused, kind, tmp_path):
    unet = fused[kind]
    files = export_unet(unet, tmp_path / "unet.onnx", "fp32", torch.device("cpu"))
    assert [f.name for f in files] == ["unet.onnx", "unet.onnx.data"]
    assert example_latent(unet.config) == (9, 7)  # the tiny UNets upsample twice: neither side divides by 4
    # batch 1 at a multiple of 4 (the other UNet branch), batch 3 at another odd size
    for batch, latent in ((1, (16, 16)), (3, (10, 13))):
        out, reference = run_both(files[0], unet, batch, latent)
        assert out.shape == reference.shape == (batch, 4, *latent)
        assert (out - reference).abs().max().item() < 2e-3 * reference.abs().max().item()


def test_graph_inputs_are_dynamic_and_typed(fused, tmp_path):
    path = export_unet(fused["sdxl"], tmp_path / "unet.onnx", "fp32", torch.device("cpu"))[0]
    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == {"sample": ["batch", 4, "height", "width"], "timestep": ["batch"],
                    "encoder_hidden_states": ["batch", 77, 64], "timestep_cond": ["batch", 512],
                    "text_embeds": ["batch", 32], "time_ids": ["batch", 6]}
    assert [o.name for o in graph.output] == ["eps"]


def test_fp16_graph(icd_home, tmp_path):
    """fp16 graphs (for TensorRT's strongly typed builds) keep the timestep in fp32 and track the fp32 UNet.
    The tiny teacher, not a fused UNet: the tiny LoRAs are too strong for fp16."""
    unet = teacher_of(resolve_model("tiny")).eval()
    path = export_unet(unet, tmp_path / "unet16.onnx", "fp16", torch.device("cpu"))[0]
    graph = onnx.load(str(path)).graph
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    assert types == {"sample": onnx.TensorProto.FLOAT16, "timestep": onnx.TensorProto.FLOAT,
                     "encoder_hidden_states": onnx.TensorProto.FLOAT16, "timestep_cond": onnx.TensorProto.FLOAT16}
    assert {t.data_type for t in graph.initializer if len(t.dims) > 1} == {onnx.TensorProto.FLOAT16}
    assert unet.dtype == torch.float32  # exported from a copy
    out, reference = run_both(path, unet, 2, (12, 8), torch.float16)
    assert (out - reference).abs().max().item() < 5e-2 * reference.abs().max().item()
    assert verify_graph(path, unet, "fp16", 1, (16, 16)) < 5e-2


def test_verification_catches_a_wrong_graph(fused, tmp_path, icd_home):
    path = export_unet(fused["sd15"], tmp_path / "unet.onnx", "fp32", torch.device("cpu"))[0]
    assert verify_graph(path, fused["sd15"], "fp32", 1, (16, 16)) < 2e-3
    teacher = teacher_of(resolve_model("tiny"))
    with pytest.raises(ExportError, match="differs from PyTorch at batch 1, latent 16x16"):
        verify_graph(path, teacher, "fp32", 1, (16, 16))  # the graph has the LoRA fused, the teacher not


def names(built):
    return {b.name: b.reused for b in built}


def test_artifacts_reused_when_valid_rebuilt_when_not(icd_home):
    manifest = resolve_model("tiny")
    folder = artifacts_dir(manifest)
    expected = {f"unet-{d}-fp32.{ext}" for d in ("forward", "reverse") for ext in ("safetensors", "onnx")}
    expected.add("unet-reverse-p2p-fp32.onnx")  # Prompt-to-Prompt's graph, beside the plain one
    first = names(export_model(manifest, ("fp32",)))
    assert first == dict.fromkeys(expected, False)
    assert folder.name == manifest.fingerprint
    index = json.loads((folder / "index.json").read_text())
    assert index["fingerprint"] == manifest.fingerprint and index["format"] == artifacts.FORMAT
    graph = index["artifacts"]["unet-reverse-fp32.onnx"]
    assert graph["example"] == [2, 9, 7] and graph["verified"] == [1, 16, 16] and graph["relative_error"] < 2e-3
    assert set(graph["files"]) == {"unet-reverse-fp32.onnx", "unet-reverse-fp32.onnx.data"}

    assert names(export_model(manifest, ("fp32",))) == dict.fromkeys(expected, True)

    data = folder / "unet-forward-fp32.onnx.data"  # a build cut short
    data.write_bytes(data.read_bytes()[:100])
    rebuilt = names(export_model(manifest, ("fp32",)))
    assert [n for n, reused in rebuilt.items() if not reused] == ["unet-forward-fp32.onnx"]
    assert Index.open(manifest).intact("unet-forward-fp32.onnx")

    stale = json.loads((folder / "index.json").read_text())  # another model's (or format's) index
    (folder / "index.json").write_text(json.dumps({**stale, "fingerprint": "0" * 16}))
    assert names(export_model(manifest, ("fp32",))) == dict.fromkeys(expected, False)
    assert names(export_model(manifest, ("fp32",), force=True)) == dict.fromkeys(expected, False)

    index = Index.open(manifest)
    assert index.matching(kind="onnx", precision="fp32") == ["unet-forward-fp32.onnx", "unet-reverse-fp32.onnx"]
    index.remove("unet-reverse-fp32.onnx")
    assert not (folder / "unet-reverse-fp32.onnx").exists() and not (folder / "unet-reverse-fp32.onnx.data").exists()
    assert Index.open(manifest).find(kind="onnx", direction="reverse") is None


def test_fused_weights_load_without_the_teacher(icd_home, monkeypatch):
    manifest = resolve_model("tiny")
    export_model(manifest, ("fp32",), onnx=False)
    reference = fused_fp32(manifest, "forward", "reverse")

    def no_teacher(*args):
        raise AssertionError("the teacher was read although fused weights exist")

    monkeypatch.setattr(loading, "load_teacher", no_teacher)  # what fuse_unets reads the teacher with
    session = unets_session(manifest, torch.float32)
    for loaded, fresh in zip(session.engine.unets(session.model, "forward", "reverse"), reference):
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        state = fresh.state_dict()
        assert all(torch.equal(value, state[name]) for name, value in loaded.state_dict().items())
    # bf16 has no file of its own: the fp32 one is cast
    bf16_session = unets_session(manifest, torch.bfloat16)
    (bf16,) = bf16_session.engine.unets(bf16_session.model, "reverse")
    assert bf16.dtype == torch.bfloat16
    assert load_fused_unet(resolve_model("tiny-sdxl"), {}, "reverse", torch.float32, torch.device("cpu")) is None


def test_cpu_sessions_open_the_exports_fully_optimised_graphs(icd_home):
    """The export optimises every fp32 graph for this CPU once, as an artifact of its own; sessions open that
    version without optimising (same outputs); a graph rebuilt since is opened as it is until the next export
    optimises it again, which also removes the outdated version."""
    import onnxruntime as ort

    manifest = resolve_model("tiny")
    export_model(manifest, ("fp32",))
    index = Index.open(manifest)
    for name in ("unet-forward-fp32.onnx", "unet-reverse-fp32.onnx", "unet-reverse-p2p-fp32.onnx"):
        optimized = find_cpu_optimized(index, name)
        assert optimized.is_file() and optimized.with_name(optimized.name + ".data").is_file()
    graph = index.folder / "unet-reverse-fp32.onnx"
    outdated = find_cpu_optimized(index, graph.name)
    session = onnx_session(graph, torch.device("cpu"), outdated)
    assert session._model_path == str(outdated)
    # its threads sleep between runs instead of spinning on the cores torch needs next (BENCHMARKS.md)
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    config = unet_config(manifest)
    feeds = {k: v.numpy() for k, v in random_inputs(config, 1, (16, 16), torch.float32, seed=3).items()}
    (fast,), (reference,) = session.run(["eps"], feeds), plain.run(["eps"], feeds)
    assert abs(fast - reference).max() < 1e-4 * abs(reference).max()

    index._changes[graph.name] = {**index.entries[graph.name], "sha256": "0" * 64}  # as a rebuild would
    index._save()
    assert find_cpu_optimized(index, graph.name) is None
    assert onnx_session(graph, torch.device("cpu"))._model_path == str(graph)
    export_model(manifest, ("fp32",))
    index.reload()
    assert find_cpu_optimized(index, graph.name).is_file() and not outdated.exists()
    assert not outdated.with_name(outdated.name + ".data").exists()
    assert not [p for p in index.folder.iterdir() if p.name.startswith(".") and p.name != ".lock"]


def test_threads_given_reach_torch_and_onnx_runtime(icd_home, tmp_path, monkeypatch):
    """An in-process command's --threads is torch's thread count before any ONNX Runtime session opens, and
    each session takes the same count (not torch's default, not OMP_NUM_THREADS=1 of the tests)."""
    from click.testing import CliRunner
    from PIL import Image

    import icd_export.onnx as onnx_module
    from icd.app import session as session_module
    from icd.app.cli import main
    from icd.models import threads

    export_model(resolve_model("tiny"), ("fp32",))  # the graphs (kept from the tests above when they ran)
    opened = []

    def spying(path, device, optimized=None):
        session = onnx_session(path, device, optimized)
        opened.append((session.get_session_options().intra_op_num_threads, torch.get_num_threads()))
        return session

    monkeypatch.setattr(onnx_module, "onnx_session", spying)
    monkeypatch.setattr(session_module, "_OPEN", {})  # the model opened afresh
    monkeypatch.setattr(threads, "_given", None)
    Image.new("RGB", (128, 128), (200, 40, 40)).save(tmp_path / "photo.png")
    try:
        result = CliRunner().invoke(main, ["invert", str(tmp_path / "photo.png"), "--prompt", "a red square", "-m",
                                           "tiny", "--backend", "onnx", "--threads", "3", "--no-server", "-q", "-o",
                                           str(tmp_path / "x.latent.safetensors")])
        assert result.exit_code == 0, result.output
        assert opened == [(3, 3)]  # the forward graph: invert's one UNet
    finally:
        torch.set_num_threads(1)
