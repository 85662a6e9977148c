"""Whole loops replayed as one captured graph (icd_export.graphs): every pipeline loop is a function of its
inputs, so a replay fed new photos, prompts, masks and blend words gives what an eager run gives.

A loop's first call runs eagerly, its second records the graph, the third and later replay it. Without a
GPU the `Rerun` recorder stands in for CUDA's: a replay runs the loop recorded (with the recording call's
Python closure) over the static buffers the later call copied its inputs into. A loop that read
a tensor from its closure instead of its inputs would replay the recording call's prompts or control here
and fail these tests. The CUDA test at the end runs the real recorder where a GPU exists.
"""

import logging

import pytest
import torch

from icd import pipeline
from icd.app.session import Session, open_session
from icd.core.denoiser import Conditioning
from icd.editing import P2PConfig, edit_plan
from icd_export.graphs import LoopGraphs, Rerun, captures_loops, signature

SCENES = [("a red circle on a sandy background", "a blue circle on a sandy background"),
          ("a green square on a grassy background", "a green square on a snowy background"),
          ("a white triangle on a snowy background", "a black triangle on a snowy background")]
BLEND = P2PConfig(blend=(("red",), ("blue",)))


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
        config = P2PConfig(cross_replace=windows[0], self_replace=windows[1], blend=words)
        plan = edit_plan(eager.manifest, source, target, method="p2p", p2p=config)
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


def test_graphs_are_kept_per_shape_up_to_the_capacity():
    graphs = LoopGraphs("cpu", Rerun(), capacity=2)

    def loop(x, cond):
        return x * 2 + cond.embeds.sum()

    cond = Conditioning(torch.ones(1, 2, 3))
    for size in (2, 2, 3, 3, 2, 4, 4, 2):
        out = graphs.run(("double",), loop, torch.full((1, size), float(size)), cond)
        assert torch.equal(out, torch.full((1, size), 2.0 * size + 6))
    # 2: eager, recorded; 3: eager, recorded; 2 replayed; 4: eager, recorded (3 dropped, the least recently
    # used); 2 replayed
    assert graphs.recorded == 3
    assert list(graphs._graphs) == [(("double",), signature((torch.zeros(1, 4), cond))),
                                    (("double",), signature((torch.zeros(1, 2), cond)))]


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
    assert captures_loops("cuda", "torch")
    assert not captures_loops("cuda", "onnx") and not captures_loops("cuda", "tensorrt")
    assert not captures_loops("cpu", "torch")
    monkeypatch.setenv("ICD_CUDA_GRAPHS", "0")
    assert not captures_loops("cuda", "torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_on_cuda_captured_loops_equal_eager(icd_home, dtype):
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    captured = open_session("mini", "cuda", name, "torch", directions=("forward", "reverse"))
    assert captured.graphs is not None
    eager = Session(captured.model, captured.engine)
    for i, (source, target) in enumerate(SCENES):
        x_T = pipeline.invert(eager, pixels(i).cuda(), source, seed=0)
        torch.testing.assert_close(pipeline.invert(captured, pixels(i).cuda(), source, seed=0), x_T,
                                   rtol=0, atol=2e-2)
        for method in ("p2p", "swap"):
            plan = edit_plan(eager.manifest, source, target, method=method, p2p=BLEND if method == "p2p" else None)
            got, expected = (pipeline.edit(s, x_T, plan) for s in (captured, eager))
            torch.testing.assert_close(got.edited, expected.edited, rtol=0, atol=2 / 255)
    assert captured.graphs.recorded == 3
