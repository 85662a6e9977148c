"""Whole loops replayed as one captured graph (icd_export.graphs): every pipeline loop is a function of its
inputs, so a replay fed new photos, prompts, masks and blend words gives what an eager run gives.

A loop's first call runs eagerly, its second records the graph, the third and later replay it. Without a
GPU the `Rerun` recorder stands in for CUDA's: a replay runs the loop recorded (with the recording call's
Python closure) over the static buffers the later call copied its inputs into. A loop that read
a tensor from its closure instead of its inputs would replay the recording call's prompts or control here
and fail these tests. `FakeCuda` logs where the real recorder and TensorRT's replay queue their work (device,
stream, pool); the CUDA test at the end runs the real recorder where a GPU exists, on a second GPU too.
"""

import logging

import pytest
import torch

from icd import pipeline
from icd.app.session import Session, open_session
from icd.core.denoiser import Conditioning
from icd.editing import edit_plan
from icd.models.loading import claim_device
from icd_export.engines import OnnxEngine, TensorRTEngine, TorchEngine
from icd_export.graphs import CAPACITY, LoopGraphs, signature
from icd_export.tensorrt import TensorRTEps

from fixtures.recorders import FakeCuda, Rerun

SCENES = [("a red circle on a sandy background", "a blue circle on a sandy background"),
          ("a green square on a grassy background", "a green square on a snowy background"),
          ("a white triangle on a snowy background", "a black triangle on a snowy background")]
BLEND = {"blend": (("red",), ("blue",))}


def pixels(seed: int) -> torch.Tensor:
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def graphed(eager: Session, recorder=None) -> Session:
    """The eager session's model and UNets, its loops captured."""
    return Session(eager.model, eager.engine, graphs=LoopGraphs(eager.model.device, recorder or Rerun()))


@pytest.fixture(scope="module")
def sessions(icd_home):
    eager = open_session("mini", "cpu", "fp32", "torch", directions=("forward", "reverse"))
    return eager, graphed(eager)


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_inversion_replays_with_new_photos_prompts_and_seeds(sessions):
    eager, captured = sessions
    for i, (source, _) in enumerate(SCENES):
        same(pipeline.invert(captured, pixels(i), source, seed=i), pipeline.invert(eager, pixels(i), source, seed=i))
        assert captured.graphs.recorded == (0 if i == 0 else 1)  # a single photo records nothing


@pytest.mark.parametrize("method", ["p2p", "swap", "none"])
@pytest.mark.parametrize("masked", [False, True], ids=["whole", "mask"])
def test_edits_replay_with_new_inputs(sessions, method, masked):
    eager, captured = sessions
    before = captured.graphs.recorded
    for i, (source, target) in enumerate(SCENES):
        x_T = pipeline.invert(eager, pixels(i), source, seed=0)
        mask = None
        if masked:
            mask = torch.zeros(1, 1, 64, 64)
            mask[..., 8 * i:32 + 8 * i, 16:48] = 1.0
        plan = edit_plan(eager.manifest, source, target, method=method)
        got, expected = (pipeline.edit(s, x_T, plan, mask=mask) for s in (captured, eager))
        same(got.edited, expected.edited)
        if expected.reconstruction is not None:
            same(got.reconstruction, expected.reconstruction)
        if expected.mask is not None:
            same(got.mask, expected.mask)
    assert captured.graphs.recorded == before + 1  # the third scene replayed the second one's graph


def test_blend_words_and_windows_replay_with_their_own_maps_and_notes(sessions):
    eager, captured = sessions
    source, target = SCENES[0]
    x_T = pipeline.invert(eager, pixels(7), source, seed=0)
    for words, windows in [((("red",), ("blue",)), (0.3, 0.6)), ((("red",), ("blue",)), (0.3, 0.6)),
                           ((("circle",), ("circle",)), (0.9, 0.3))]:  # the third replays with other windows
        plan = edit_plan(eager.manifest, source, target, method="p2p", cross_replace=windows[0],
                         self_replace=windows[1], blend=words)
        got, expected = (pipeline.edit(s, x_T, plan) for s in (captured, eager))
        same(got.edited, expected.edited)
        same(got.mask, expected.mask)
        assert got.notes == expected.notes
        assert any(":".join(" ".join(w) for w in words) in note for note in got.notes)  # this edit's words


def test_reconstruct_and_generate_share_the_decoding_graph(sessions):
    eager, captured = sessions
    x_T = pipeline.invert(eager, pixels(3), SCENES[0][0], seed=0)
    recorded = captured.graphs.recorded
    for guidance in (0.0, 2.0):  # another guidance is another graph
        for i in range(2):
            same(pipeline.reconstruct(captured, x_T, SCENES[i][0], guidance=guidance),
                 pipeline.reconstruct(eager, x_T, SCENES[i][0], guidance=guidance))
            same(pipeline.generate(captured, SCENES[i][1], i, 64, 64, guidance=guidance, tau=1.0),
                 pipeline.generate(eager, SCENES[i][1], i, 64, 64, guidance=guidance, tau=1.0))
    assert captured.graphs.recorded == recorded + 2


def test_a_loop_that_cannot_be_recorded_runs_eagerly_and_says_so_once(sessions, caplog):
    eager, _ = sessions

    def refuses(run, device):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    session = graphed(eager, refuses)
    with caplog.at_level(logging.WARNING, logger="icd"):
        for _ in range(3):
            same(pipeline.invert(session, pixels(1), SCENES[0][0], seed=0),
                 pipeline.invert(eager, pixels(1), SCENES[0][0], seed=0))
    warnings = [r.getMessage() for r in caplog.records if "CUDA graph" in r.getMessage()]
    assert warnings == ["could not capture the invert loop as a CUDA graph, running it step by step: "
                        "operation not permitted when stream is capturing"]
    assert session.graphs.recorded == 0


def doubling(graphs: LoopGraphs, sizes: tuple[int, ...]) -> list[int]:
    """Runs a loop on inputs of each size in turn (each output checked); the graphs recorded after each call."""
    cond, recorded = Conditioning(torch.ones(1, 2, 3)), []
    for size in sizes:
        out = graphs.run(("double",), lambda x, c: x * 2 + c.embeds.sum(), torch.full((1, size), 1.0 * size), cond)
        assert torch.equal(out, torch.full((1, size), 2.0 * size + 6))
        recorded.append(graphs.recorded)
    return recorded


def test_graphs_are_kept_per_shape_up_to_the_capacity_and_an_evicted_one_is_forgotten():
    graphs = LoopGraphs("cpu", Rerun(), capacity=2)
    # 2: eager, recorded; 3: eager, recorded; 2 replayed; 4: eager, recorded (3, the least recently used, is
    # dropped and forgotten); 2 replayed; 3 runs eagerly again, as a loop never seen, then is recorded
    # (dropping 4); 3 replayed
    assert doubling(graphs, (2, 2, 3, 3, 2, 4, 4, 2, 3, 3, 3)) == [0, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4]
    cond = Conditioning(torch.ones(1, 2, 3))
    assert list(graphs._graphs) == [(("double",), signature((torch.zeros(1, size), cond))) for size in (2, 3)]


def test_a_loop_run_once_is_remembered_up_to_the_capacity():
    graphs = LoopGraphs("cpu", Rerun(), capacity=2)
    # 1, 2, 3 eager (3 makes the graphs forget 1); 1 eager again (forgetting 2), then recorded; 3, still
    # remembered, recorded
    assert doubling(graphs, (1, 2, 3, 1, 1, 3)) == [0, 0, 0, 0, 1, 2]


def test_a_serve_session_fits_the_graph_capacity(sessions):
    """Every loop an `icd serve` session runs with default settings: inversion, reconstruction (w = 0) and
    generation at batch 1 and 2 (the server batches those), and every edit method with and without a mask,
    Prompt-to-Prompt also with blend words. Run twice, each loop is recorded once and none is evicted."""
    eager, _ = sessions
    session, (source, target) = graphed(eager), SCENES[0]
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1.0
    for _ in range(2):
        for rows in (1, 2):
            x_T = pipeline.invert(session, torch.cat([pixels(i) for i in range(rows)]), [source] * rows,
                                  list(range(rows)))
            pipeline.reconstruct(session, x_T, [source] * rows)
            pipeline.generate(session, [target] * rows, list(range(rows)), 64, 64)
        for method, config in (("p2p", {}), ("p2p", BLEND), ("swap", {}), ("none", {})):
            for region in (None, mask):
                plan = edit_plan(eager.manifest, source, target, method=method, **config)
                pipeline.edit(session, x_T[:1], plan, mask=region)
    assert session.graphs.recorded == len(session.graphs._graphs) == 14
    assert 2 * 14 <= CAPACITY


def test_recording_copies_and_replays_run_on_the_loops_device_and_capture_stream(monkeypatch):
    fake = FakeCuda(monkeypatch)  # cuda:0 current, as in a process that never made its GPU current
    graphs = LoopGraphs("cuda:1")

    def loop(x):
        fake.note("loop")
        return x * 2

    with fake.copies():
        for key in ("a", "a", "a", "b", "b"):
            graphs.run((key,), loop, torch.ones(2))
    recording = [("enter", 1), ("loop", 1, "side1@1"),  # the warm-up, on the capture stream of cuda:1
                 ("capture", 1, "side1@1", ("pool", 1)), ("loop", 1, "side1@1")]
    assert fake.events == [("loop", 0, "default@0"), *recording,  # a: eager (its tensors place it), recorded
                           ("enter", 1), ("copy", 1), ("replay", 1),  # a replayed
                           ("loop", 0, "default@0"), *recording]  # b: the same stream and memory pool


class FakeEngine:
    """A TensorRT engine's calls that `TensorRTEps` makes, logging each run's device and stream."""

    def __init__(self, fake: FakeCuda):
        self.fake = fake

    def create_execution_context(self):
        return self

    def set_input_shape(self, name, shape):
        self.shape = shape

    def get_tensor_shape(self, name):
        return self.shape

    def set_tensor_address(self, name, address):
        pass

    def execute_async_v3(self, stream):
        self.fake.events.append(("enqueue", self.fake.index, stream))
        return True


def test_tensorrt_captures_and_replays_under_its_device(monkeypatch):
    fake = FakeCuda(monkeypatch)
    engine = TensorRTEps.__new__(TensorRTEps)  # its files and TensorRT itself are not needed past loading
    engine.device, engine.outputs, engine._graphs = torch.device("cuda:1"), ("eps",), {}
    engine.stream, engine.engine = torch.cuda.Stream("cuda:1"), FakeEngine(fake)
    engine.entry = {"profile": {"sample": [[1, 4, 8, 8]] * 3}}
    with fake.copies():
        for _ in range(2):
            engine._replay({"sample": torch.ones(1, 4, 8, 8)})
    assert fake.events == [("enter", 1), ("enqueue", 1, "side1@1"), ("capture", 1, "side1@1", None),
                           ("enqueue", 1, "side1@1"), ("copy", 1), ("replay", 1),
                           ("enter", 1), ("copy", 1), ("replay", 1)]


def test_a_process_on_a_gpu_makes_it_current_and_allows_tf32(monkeypatch):
    fake, before = FakeCuda(monkeypatch), torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        claim_device(torch.device("cpu"))
        assert fake.index == 0 and not torch.backends.cuda.matmul.allow_tf32
        claim_device(torch.device("cuda:1"))
        assert fake.index == 1 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_a_replay_returns_its_own_tensors_and_keeps_what_the_loop_reads():
    graphs = LoopGraphs("cpu", Rerun())
    table = torch.tensor([10.0])
    results = [graphs.run(("add",), lambda x: x + table, torch.full((1,), float(i)), keep=lambda: [table])
               for i in range(4)]
    assert [r.item() for r in results] == [10.0, 11.0, 12.0, 13.0]  # no replay overwrote an earlier result
    [graph] = graphs._graphs.values()
    assert graph.keep == [table]
    with pytest.raises(TypeError, match="not str"):
        graphs.run(("bad",), lambda x: x, "text")


def test_only_torch_on_cuda_captures(monkeypatch):
    assert TorchEngine().captures_loops("cuda")
    assert not OnnxEngine().captures_loops("cuda") and not TensorRTEngine().captures_loops("cuda")
    assert not TorchEngine().captures_loops("cpu")
    monkeypatch.setenv("ICD_CUDA_GRAPHS", "0")
    assert not TorchEngine().captures_loops("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("index", [0, 1], ids=["cuda0", "cuda1"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_on_cuda_captured_loops_equal_eager(icd_home, dtype, index):
    if index >= torch.cuda.device_count():
        pytest.skip("needs a second GPU")
    device = torch.device("cuda", index)
    captured = open_session("mini", str(device), dtype, "torch", directions=("forward", "reverse"))
    assert captured.graphs is not None and torch.cuda.current_device() == index  # the session made it current
    if torch.cuda.device_count() > 1:
        torch.cuda.set_device(1 - index)  # another GPU current: the guards alone must place the graphs' work
    eager = Session(captured.model, captured.engine)
    for i, (source, target) in enumerate(SCENES):
        x_T = pipeline.invert(eager, pixels(i).to(device), source, seed=0)
        torch.testing.assert_close(pipeline.invert(captured, pixels(i).to(device), source, seed=0), x_T,
                                   rtol=0, atol=2e-2)
        for method in ("p2p", "swap"):
            plan = edit_plan(eager.manifest, source, target, method=method, **(BLEND if method == "p2p" else {}))
            got, expected = (pipeline.edit(s, x_T, plan) for s in (captured, eager))
            torch.testing.assert_close(got.edited, expected.edited, rtol=0, atol=2 / 255)
    assert captured.graphs.recorded == 3
