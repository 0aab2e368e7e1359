import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_prune.runtime import sessions
from onnx_prune.runtime.bench import (
    LatencyResult,
    available_providers,
    benchmark,
    compare_latency,
    format_latency_table,
)
from onnx_prune.runtime.sessions import runtime_versions

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def _conv_model(batch_dim="N"):
    weight = np.random.default_rng(0).standard_normal([8, 3, 3, 3]).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def fresh_provider_probe():
    sessions.provider_problem.cache_clear()
    yield
    sessions.provider_problem.cache_clear()


def _cuda_works():
    return sessions.provider_problem(CUDA) is None


def test_benchmark_on_cpu_honours_batches():
    seen = []
    results = benchmark(_conv_model(), providers=["cpu"], batches=(1, 4), warmup=1, repeat=5, threads=1, progress=seen.append)
    assert [(result.provider, result.batch, result.runs) for result in results] == [(CPU, 1, 5), (CPU, 4, 5)]
    assert seen == results
    for result in results:
        assert 0 < result.median_ms <= result.p90_ms
        assert result.mean_ms > 0
    assert json.loads(json.dumps(results[0].to_dict()))["batch"] == 1


def test_batch_beyond_a_fixed_leading_dim_is_refused():
    with pytest.raises(ValueError, match=r"cannot run batch 2: no input has a dynamic leading dim"):
        benchmark(_conv_model(batch_dim=1), providers=["cpu"], batches=(1, 2), warmup=0, repeat=1)


def test_cuda_request_falls_back_to_cpu_with_notice(capsys, fresh_provider_probe):
    if _cuda_works():
        pytest.skip("CUDA really works here")
    assert available_providers(["CUDAExecutionProvider"]) == [CPU]
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1
    assert notice[0].startswith("onnx-prune: CUDAExecutionProvider ")
    assert notice[0].endswith(f"falling back to {CPU}")
    results = benchmark(_conv_model(), providers=["cuda"], warmup=0, repeat=2)
    assert [result.provider for result in results] == [CPU]


def test_listed_but_unusable_provider_is_caught_after_session_creation(capsys, monkeypatch, fresh_provider_probe):
    # The GPU build lists CUDA even where it cannot start; only get_providers() of a session tells.
    if _cuda_works():
        pytest.skip("CUDA really works here")
    monkeypatch.setattr(sessions.ort, "get_available_providers", lambda: [CUDA, CPU])
    sessions.provider_problem.cache_clear()  # forget the probe _cuda_works() just made
    with pytest.warns(UserWarning):  # onnxruntime's own complaint before falling back
        assert available_providers([CUDA, CPU]) == [CPU]
    assert "listed but failed to initialise" in capsys.readouterr().err
    assert available_providers(None) == [CPU]


def _result(provider, batch, median_ms):
    return LatencyResult(provider, batch, median_ms, median_ms * 1.1, median_ms, 30)


def test_compare_latency_relates_speedup_to_mac_reduction():
    base = [_result(CPU, 1, 10.0), _result(CPU, 8, 40.0)]
    pruned = [_result(CPU, 8, 25.0), _result(CPU, 1, 8.0)]
    rows = compare_latency(base, pruned, mac_reduction=2.0)
    assert [(row["batch"], row["speedup"], row["efficiency"]) for row in rows] == [(1, 1.25, 0.625), (8, 1.6, 0.8)]
    table = format_latency_table(rows).splitlines()
    assert table[2].split() == ["CPU", "1", "10.000", "8.000", "1.25x", "2.00x", "62%"]
    with pytest.raises(ValueError, match="pruned measured"):
        compare_latency(base, pruned[:1], mac_reduction=2.0)


def test_runtime_versions():
    versions = runtime_versions()
    assert set(versions) == {"onnx", "onnxruntime", "numpy", "python", "platform", "available_providers"}
    assert CPU in versions["available_providers"]


def test_check_speedup_times_both_models_alternately():
    from onnx_prune.runtime.bench import check_speedup

    check = check_speedup(_conv_model(), _conv_model(), "cpu", threads=1, batch=2, repeat=4, warmup=1)
    assert (check.provider, check.batch, check.threads, check.runs) == (CPU, 2, 1, 4)
    assert check.original_ms > 0 and check.pruned_ms > 0
    assert check.speedup == pytest.approx(check.original_ms / check.pruned_ms)
    assert json.loads(json.dumps(check.to_dict()))["speedup"] == pytest.approx(check.speedup)
    with pytest.raises(ValueError, match="repeat must be at least 1"):
        check_speedup(_conv_model(), _conv_model(), repeat=0)


def test_speed_verdict_warns_when_slower_and_fails_below_min_speedup():
    from onnx_prune.runtime.bench import EXIT_TOO_SLOW, SpeedupCheck

    slower = SpeedupCheck(CPU, 1, 2, original_ms=10.0, pruned_ms=12.5, runs=20, predicted_ms=7.0)
    assert slower.speedup == pytest.approx(0.8)
    message, status = slower.verdict()
    assert status == 0 and "SLOWER than the original" in message and "predicted 7.00 ms" in message
    message, status = slower.verdict(min_speedup=1.0)
    assert status == EXIT_TOO_SLOW == 4 and "below --min-speedup 1" in message
    faster = SpeedupCheck(CPU, 8, None, original_ms=10.0, pruned_ms=8.0, runs=20)
    assert faster.verdict() == (None, 0)
    assert faster.verdict(min_speedup=1.2) == (None, 0)
    message, status = faster.verdict(min_speedup=1.5)
    assert status == 4 and "speed-up 1.25x" in message
    # a few microseconds on a tiny model is timer jitter, not a slow-down: no warning; a gate still decides
    tiny = SpeedupCheck(CPU, 1, None, original_ms=0.030, pruned_ms=0.032, runs=200)
    assert tiny.speedup < 0.98 and tiny.verdict() == (None, 0)
    assert tiny.verdict(min_speedup=1.0)[1] == EXIT_TOO_SLOW


def test_one_cpu_thread_is_timed_by_its_cpu_time():
    import time

    from onnx_prune.runtime.bench import check_speedup, run_clock

    assert run_clock(1) == ("cpu", time.thread_time)
    assert run_clock(2) == ("wall", time.perf_counter)
    assert run_clock(None) == ("wall", time.perf_counter)
    assert run_clock(1, "cuda") == ("wall", time.perf_counter)
    assert [r.clock for r in benchmark(_conv_model(), providers=["cpu"], warmup=0, repeat=2, threads=1)] == ["cpu"]
    assert check_speedup(_conv_model(), _conv_model(), threads=2, repeat=2, warmup=0).clock == "wall"


def test_cli_min_speedup_fails_with_exit_4_and_writes_nothing(tmp_path, capsys):
    from pathlib import Path

    from onnx_prune.cli import main

    fixture = Path(__file__).resolve().parent.parent / "models" / "fixtures" / "residual_add.onnx"
    out = tmp_path / "pruned.onnx"
    # no pruning makes a model 1000 times faster: the gate fails whatever the clock says
    assert main([str(fixture), str(out), "--ratio", "0.3", "--min-speedup", "1000", "--threads", "1"]) == 4
    assert not out.exists()
    assert "--min-speedup" in capsys.readouterr().err
    assert main([str(fixture), str(out), "--ratio", "0.3", "--min-speedup", "0.001", "--threads", "1",
                 "--quiet"]) == 0
    assert out.exists()
