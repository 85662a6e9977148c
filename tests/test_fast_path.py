"""The fast path: every edit method gives the same pixels on every backend (eager torch, torch.compile,
ONNX Runtime), Prompt-to-Prompt included; the compiled Prompt-to-Prompt UNet compiles once per shape; each
prompt pair's control is built once.

Tolerance: one level of 255 per channel (pixels in [-1, 1], so 2/255). ONNX Runtime and torch differ by
about 1e-6 per UNet call in fp32; four calls and the VAE keep that far below a level on `mini` and `tiny`.
Decoding starts from one x_T per model (tiny's inversion is ill-conditioned, see test_pinned_outputs)."""

import pytest
import torch

pytest.importorskip("onnxruntime", reason="the onnx extra (pip install -e '.[onnx]') is not installed")

from icd import pipeline  # noqa: E402
from icd.app.session import Session, open_session  # noqa: E402
from icd.editing import edit_plan  # noqa: E402
from icd.p2p import PromptToPrompt  # noqa: E402
from icd_export.engines import TorchEngine  # noqa: E402

LEVEL = 2 / 255  # one level of 255 in [-1, 1]
PROMPTS = {"mini": ("a red circle on a sandy background", "a blue circle on a sandy background"),
           "tiny": ("a red cat", "a blue cat")}
LATENTS = {"mini": (8, 8), "tiny": (8, 12)}
BACKENDS = ("torch", "compile", "onnx")


COMPILED: dict[str, Session] = {}


def compiled_session(model: str, compiler) -> Session:
    """The model's session with its UNets compiled by `compiler` (the torch.compile backend)."""
    eager = open_session(model, "cpu", "fp32", "torch")
    return Session(eager.model, TorchEngine("default", compiler))


def open_on(model: str, backend: str):
    if backend == "compile":
        if model not in COMPILED:
            COMPILED[model] = compiled_session(model, "eager")
        return COMPILED[model]
    return open_session(model, "cpu", "fp32", backend)


@pytest.fixture(scope="module")
def fast_compiler(icd_home):
    """torch.compile with a compiler that only traces (inductor's C++ builds take minutes on this CPU): what
    is tested is that the models compile as one graph and keep their results."""
    torch._dynamo.reset()
    yield
    COMPILED.clear()


@pytest.fixture(scope="module")
def x_T():
    return {model: torch.randn(1, 4, *latent, generator=torch.Generator().manual_seed(5))
            for model, latent in LATENTS.items()}


@pytest.mark.parametrize("model", ["mini", "tiny"])
@pytest.mark.parametrize("method", ["p2p", "swap", "none"])
def test_every_method_equal_on_every_backend(fast_compiler, x_T, model, method):
    source, target = PROMPTS[model]
    plan = edit_plan(open_on(model, "torch").manifest, source, target, method=method)
    results = {backend: pipeline.edit(open_on(model, backend), x_T[model], plan) for backend in BACKENDS}
    reference = results["torch"].edited
    assert reference.shape == (1, 3, *(8 * n for n in LATENTS[model]))
    for backend in ("compile", "onnx"):
        difference = (results[backend].edited - reference).abs().max().item()
        assert difference <= LEVEL, f"{backend}: {difference * 127.5:.2f} levels from eager torch"
        if method == "p2p":
            difference = (results[backend].reconstruction - results["torch"].reconstruction).abs().max().item()
            assert difference <= LEVEL, f"{backend} reconstruction: {difference * 127.5:.2f} levels"
    if method == "p2p":  # the edit did something: the target row is not the source's reconstruction
        assert (reference - results["torch"].reconstruction).abs().max().item() > 10 * LEVEL


def test_invert_equal_on_every_backend(fast_compiler):
    """mini's inversion is well conditioned: x_T itself agrees across backends (and stays on the device)."""
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = {backend: pipeline.invert(open_on("mini", backend), pixels, PROMPTS["mini"][0], seed=3)
               for backend in BACKENDS}
    for backend in ("compile", "onnx"):
        assert latents[backend].device == torch.device("cpu")
        torch.testing.assert_close(latents[backend], latents["torch"], rtol=0, atol=1e-4)


def test_compiles_once_per_shape(icd_home, monkeypatch, x_T):
    """Steps, prompt pairs and edits reuse one graph per shape: P2P (2 rows) once, the plain reverse UNet
    (1 row, swap) once; a new latent size is a new shape."""
    graphs = []

    def counting(graph_module, example_inputs):
        graphs.append(tuple(tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor))[:1])
        return graph_module.forward

    torch._dynamo.reset()
    session = compiled_session("tiny", counting)
    edits = [("a red cat", "a blue cat"), ("a red cat", "a green dog"), ("a cat", "a fat cat")]
    for source, target in edits:
        pipeline.edit(session, x_T["tiny"], edit_plan(session.manifest, source, target, method="p2p"))
    assert len(graphs) == 1
    for source, target in edits[:2]:
        pipeline.edit(session, x_T["tiny"], edit_plan(session.manifest, source, target, method="swap"))
    assert len(graphs) == 2
    plan = edit_plan(session.manifest, "a red cat", "a blue cat", method="p2p")
    pipeline.edit(session, torch.randn(1, 4, 8, 8), plan)
    assert len(graphs) == 3
    torch._dynamo.reset()


def test_control_built_once_per_prompt_pair(icd_home, monkeypatch, x_T):
    built = []
    real_init = PromptToPrompt.__init__

    def counted(self, tokenizer, source, target, *args, **kwargs):
        built.append((source, target))
        real_init(self, tokenizer, source, target, *args, **kwargs)

    monkeypatch.setattr(PromptToPrompt, "__init__", counted)
    session = open_on("tiny", "torch")
    first = pipeline.edit(session, x_T["tiny"], edit_plan(session.manifest, "a red cat", "a fat cat", method="p2p"))
    again = pipeline.edit(session, x_T["tiny"], edit_plan(session.manifest, "a red cat", "a fat cat", method="p2p"))
    assert built == [("a red cat", "a fat cat")]  # the second edit is a cache hit
    assert torch.equal(first.edited, again.edited)  # and the cached controller starts afresh
    pipeline.edit(session, x_T["tiny"], edit_plan(session.manifest, "a red cat", "a fat dog", method="p2p"))
    assert built == [("a red cat", "a fat cat"), ("a red cat", "a fat dog")]
