"""`xllm-port bench` on CPU: the op table, the end-to-end decode and beam-search tables, small sizes;
the gates' GPU timer."""
import json
import time

import pytest
import torch

from xllm_sampling import gate
from xllm_sampling.port.cli import run


def test_op_bench_reports_every_cell_with_its_floor(capsys):
    assert run(["bench", "--ops", "logit_softmax", "topk", "--batch", "1", "3", "--vocab", "1000", "--reps", "3",
                "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["header"]["device"] in ("cpu", "cuda") and report["header"]["copy_bandwidth_GBps"] > 0
    cells = report["cells"]
    assert [(c["op"], c["batch"]) for c in cells] == [("logit_softmax", 1), ("logit_softmax", 3), ("topk", 1), ("topk", 3)]
    assert all(c["floor_us"] > 0 and c["original_us"] > 0 and c["fast_us"] > 0 for c in cells)


def test_op_bench_times_the_same_rows_in_every_run():
    """A cell's logits are seeded: two runs time the same rows (a batch-1 sampling call's time
    depends on its row), and the copies that defeat the L2 differ from each other."""
    from xllm_sampling import bench

    first, again, other = (bench._logits(2, 500, "cpu", seed=s) for s in (0, 0, 1))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_op_bench_topk_variants_run(capsys):
    """k = 1024 and unsorted top-k cells are on request; every implementation that exists gives a time."""
    ops = ["topk_unsorted", "topk1024", "topk1024_unsorted"]
    assert run(["bench", "--ops", *ops, "--batch", "2", "--vocab", "3000", "--reps", "2", "--json"]) == 0
    cells = json.loads(capsys.readouterr().out)["cells"]
    assert [c["op"] for c in cells] == ops
    assert all(c["original_us"] > 0 and c["fast_us"] > 0 for c in cells)


def test_host_bench_times_each_fast_path_back_to_back(capsys):
    """--host: one row per (op, batch) with the fast path's wall time per call (device time on a GPU
    only) and the text table's columns."""
    assert run(["bench", "--host", "--ops", "logit_softmax", "beam_search", "--batch", "1", "2", "--vocab", "500",
                "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["header"]["vocab"] == 500 and report["header"]["calls"] > 1
    rows = report["host"]
    assert [(r["op"], r["batch"]) for r in rows] == [("logit_softmax", 1), ("logit_softmax", 2), ("beam_search", 1),
                                                     ("beam_search", 2)]
    gpu = report["header"]["device"] == "cuda"
    assert all(0 < r["fast"]["best_wall_us"] <= r["fast"]["wall_us"] and (r["fast"]["device_us"] is not None) == gpu
               for r in rows)
    assert run(["bench", "--host", "--ops", "topk", "--vocab", "500"]) == 0
    out = capsys.readouterr().out
    assert "overhead" in out and "topk" in out


def test_spec_bench_times_each_level_against_k(capsys):
    """--spec: one row per (batch, K) with each level's time per call; FlashInfer n/a without it;
    launch counts only on a GPU; a K below 1 is a usage error."""
    assert run(["bench", "--spec", "--levels", "loop", "flashinfer", "--k", "1", "3", "--batch", "2", "--vocab", "300",
                "--reps", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["levels"] == ["loop", "flashinfer"] and report["header"]["vocab"] == 300
    assert [(r["batch"], r["k"]) for r in report["spec"]] == [(2, 1), (2, 3)]
    gpu = report["header"]["device"] == "cuda"
    for r in report["spec"]:
        assert r["loop"]["us"] > 0 and (r["loop"]["launches"] is not None) == gpu
        assert gpu or r["flashinfer"] is None
    assert run(["bench", "--spec", "--levels", "loop", "--k", "2", "--batch", "1", "--vocab", "300", "--reps", "2"]) == 0
    assert "rejection sampling" in capsys.readouterr().out
    assert run(["bench", "--spec", "--k", "0"]) == 2
    assert "--k" in capsys.readouterr().err


def test_spec_bench_as_an_op_and_a_compile_error_reported(capsys, monkeypatch):
    """--ops spec_decode is --spec (alone); a level torch.compile cannot build is reported in its
    cell and the other levels are still timed."""
    import torch

    from xllm_sampling import bench_spec

    real = bench_spec._call
    tries = []

    def failing(level, *args):
        if level != "compiled":
            return real(level, *args)

        def fn():
            tries.append(1)
            raise torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, AssertionError("inductor"), None)
        return fn

    monkeypatch.setattr(bench_spec, "_call", failing)
    assert run(["bench", "--ops", "spec_decode", "--levels", "loop", "compiled", "--k", "1", "2", "--batch", "1",
                "--vocab", "300", "--reps", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["spec"]
    assert all(r["loop"]["us"] > 0 and r["compiled"] == {"error": "AssertionError in torch.compile"} for r in rows)
    assert len(rows) == 2 and len(tries) == 1  # not tried again for the second K
    assert run(["bench", "--ops", "spec_decode", "--levels", "compiled", "--k", "1", "--batch", "1", "--vocab", "300",
                "--reps", "2"]) == 0
    assert "compile error" in capsys.readouterr().out
    assert run(["bench", "--ops", "spec_decode", "topk"]) == 2
    assert "--ops" in capsys.readouterr().err


def test_decode_bench_switches_the_steps_on_cumulatively(capsys):
    """--decode: all off, then one more step on at a time in series order, up to all on; every
    figure of the protocol, medians of three runs, consistent with each other."""
    assert run(["bench", "--decode", "--batch", "2", "--vocab", "512", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["header"]["preset"] == "tiny" and report["header"]["vocab"] == 512 and report["header"]["runs"] == 3
    rows = report["decode"]
    steps = ("logit_softmax", "air_topk", "sampler", "beam_search", "cuda_graph", "nvtx", "spec_decode")
    assert [r["config"] for r in rows] == ["all off", *(f"+ {s}" for s in steps[:-1]), "all on"]
    long = report["header"]["tokens"]
    for r in rows:
        assert r["batch"] == 2 and 0 < r["prefill_ms"] and 0 < r["ttft_ms"] < r["total_ms"] and r["tpot_spread_ms"] >= 0
        assert r["tpot_ms"] > 0 and abs(r["tokens_per_s"] - 2 * long / (r["total_ms"] * 1e-3)) < 1e-6 * r["tokens_per_s"]
        assert r["sampling_share"] > 0 and (r["peak_mib"] is None) == (report["header"]["device"] == "cpu")
        if report["header"]["device"] == "cpu":  # no graphs on CPU: every step eager
            assert r["graph_replays"] == 0 and r["graph_eager_calls"] >= 3 * (long - 1)  # 3 runs of 35 decode steps
    assert run(["bench", "--decode", "--batch", "1", "--vocab", "512"]) == 0
    out = capsys.readouterr().out
    assert "all on" in out and "TPOT ms (spread)" in out


def test_decode_bench_rejects_an_unknown_preset(capsys):
    assert run(["bench", "--decode", "--preset", "huge"]) == 2
    assert "--preset" in capsys.readouterr().err


def test_op_bench_beam_widths_count_requests(capsys):
    """beam_search_w1 / beam_search / beam_search_w8 time 1, 4 and 8 beams per request; the floor
    reads batch x beams rows, and each timed state is rewound before its history is full."""
    ops = ["beam_search_w1", "beam_search", "beam_search_w8"]
    assert run(["bench", "--ops", *ops, "--batch", "2", "--vocab", "500", "--reps", "2", "--json"]) == 0
    cells = json.loads(capsys.readouterr().out)["cells"]
    assert [c["op"] for c in cells] == ops
    assert all(c["original_us"] > 0 and c["fast_us"] > 0 for c in cells)
    floors = [c["floor_us"] for c in cells]
    assert abs(floors[1] / floors[0] - 4) < 1e-6 and abs(floors[2] / floors[0] - 8) < 1e-6


def test_beam_bench_times_whole_searches_flag_off_and_on(capsys):
    assert run(["bench", "--beam", "--batch", "1", "2", "--vocab", "512", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["beam"]
    assert [(r["batch"], r["beam_search"]) for r in rows] == [(1, False), (1, True), (2, False), (2, True)]
    assert all(r["seconds"] > 0 and abs(r["tokens_per_s"] - r["batch"] * 32 / r["seconds"]) < 1e-6 * r["tokens_per_s"]
               for r in rows)
    assert run(["bench", "--beam", "--batch", "1", "--vocab", "512"]) == 0
    assert "speed-up" in capsys.readouterr().out


def test_speculative_bench_times_plain_and_speculative_generation(capsys):
    """--speculative: plain decoding, then each K with the flag off and on; tokens/s from the time,
    the share of drafts accepted in [0, 1] and the same for both flag values (same tokens)."""
    assert run(["bench", "--speculative", "--batch", "1", "--k", "1", "3", "--vocab", "512", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["speculative"]
    assert [(r["mode"], r["k"], r["spec_decode"]) for r in rows] == [
        ("plain", None, None), ("speculative", 1, False), ("speculative", 1, True), ("speculative", 3, False),
        ("speculative", 3, True)]
    assert all(r["seconds"] > 0 and abs(r["tokens_per_s"] - 32 / r["seconds"]) < 1e-6 * r["tokens_per_s"] for r in rows)
    assert rows[0]["acceptance"] is None and all(0 <= r["acceptance"] <= 1 for r in rows[1:])
    assert rows[1]["acceptance"] == rows[2]["acceptance"] and rows[3]["acceptance"] == rows[4]["acceptance"]
    assert run(["bench", "--speculative", "--batch", "1", "--k", "2", "--vocab", "512"]) == 0
    assert "vs plain" in capsys.readouterr().out
    assert run(["bench", "--speculative", "--k", "0"]) == 2


def test_beam_bench_state_is_rewound_before_its_history_is_full():
    """More calls than a timed state has steps: without the rewind the step past max_length would fail."""
    import torch

    from xllm_sampling import bench

    step = bench._beam_step(2)
    x = torch.randn(2, 50)
    for _ in range(bench.BEAM_STEPS + 3):
        step(x, None)


@pytest.mark.cuda
def test_gate_timer_times_the_gpu_alone_when_the_host_queues_slower_than_the_spin():
    """A call whose host work outlasts the spin kernel (3 ms here, against a first spin of ~1 ms)
    is timed again behind longer spins: the figure is the kernel's microseconds, not the host's
    milliseconds."""
    timer = gate.Timer("cuda", host_overhead=False)
    x = torch.ones(1024, device="cuda")

    def slow_host():
        time.sleep(0.003)
        x.add_(1)

    assert timer(slow_host) < 1000 and timer.spin_cycles > 2_000_000
