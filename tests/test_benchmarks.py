"""Smoke tests of the benchmarks in their smallest CPU modes, so that they keep running.

The scripts run as CI would run them (a subprocess, the command line of their docstrings), and their
JSON is checked for what the tables are built from: correctness numbers against the fp64 reference
or the paper's formulation, ratio columns that follow from the measured times, the same number of
generated tokens in every variant. Speed itself is not asserted here (2 shared CPU cores).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import linearpatch_kernels as lp

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _load(script: str):
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), BENCH / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def test_bench_patch_cpu_smoke(tmp_path):
    proc = _run("bench_patch.py", "--device", "cpu", "--tokens", "8", "--d", "576", "--repeats", "2",
                "--threads", "1", "--out-dir", str(tmp_path))
    result = json.loads((tmp_path / "bench_patch.json").read_text())
    rows = {r["provider"]: r for r in result["rows"]}
    assert {"ours-torch", "paper-fp32", "copy"} <= {n for n, r in rows.items() if "median_us" in r}
    # Both formulations of P against x.double() @ P64: the project's fp32 accuracy target.
    assert rows["ours-torch"]["rel_error"] <= 1e-5
    assert rows["paper-fp32"]["rel_error"] <= 1e-5
    ours, paper, copy = rows["ours-torch"], rows["paper-fp32"], rows["copy"]
    assert ours["median_us"] > 0 and ours["rounds"] == 2 and ours["buffers"] >= 2
    assert ours["speedup_vs_paper"] == pytest.approx(paper["median_us"] / ours["median_us"])
    assert ours["pct_of_copy"] == pytest.approx(100 * copy["median_us"] / ours["median_us"])
    assert ours["GB/s"] == pytest.approx(2 * 8 * 576 * 4 / (ours["median_us"] * 1e-6) / 1e9)
    # The interpreter is no speed provider; CUDA-only providers are listed as not run.
    assert "skipped" in rows["ours-cuda"] and "skipped" in rows["fht-twice"]
    assert "ours-triton" not in rows or "skipped" in rows["ours-triton"]
    assert result["env"]["torch"] == torch.__version__ and len(result["env"]["loadavg_start"]) == 3
    table = (tmp_path / "bench_patch.txt").read_text()
    assert "ours-torch" in table and "paper-fp32" in table and "load average" in table
    assert (tmp_path / "bench_patch.png").exists() == _matplotlib()
    assert "ours-torch" in proc.stdout


def test_bench_patch_error_rows_for_wrong_or_failing_providers(monkeypatch):
    bench = _load("bench_patch.py")
    original = bench.build_providers

    def with_bad_providers(*args, **kwargs):
        providers, absent = original(*args, **kwargs)

        def broken(x, y):
            raise RuntimeError("kernel exploded")

        providers["off-by-one-percent"] = lambda x, y: x @ args[3].float() * 1.01
        providers["broken"] = broken
        return providers, absent

    monkeypatch.setattr(bench, "build_providers", with_bad_providers)
    rows = bench.bench_config(torch.device("cpu"), torch.float32, 64, 4, repeats=2, budget_s=None, wanted=None,
                              cuda_graph=False)
    by = {r["provider"]: r for r in rows}
    assert "median_us" not in by["off-by-one-percent"] and "exceeds" in by["off-by-one-percent"]["error"]
    assert by["off-by-one-percent"]["rel_error"] == pytest.approx(1e-2, rel=1e-3)
    assert "median_us" not in by["broken"] and "kernel exploded" in by["broken"]["error"]
    assert by["ours-torch"]["median_us"] > 0 and by["ours-torch"]["rel_error"] <= 1e-5
    assert "ERROR" in bench.format_table(rows)


def test_bench_e2e_small_cpu_smoke(tmp_path):
    _run("bench_e2e.py", "--small", "--device", "cpu", "--threads", "1", "--prefill", "1x16", "--decode-batch", "2",
         "--prompt-len", "8", "--new-tokens", "5", "--repeats", "2", "--decode-repeats", "1",
         "--out-dir", str(tmp_path))
    result = json.loads((tmp_path / "bench_e2e.json").read_text())
    variants = {"dense", "pruned", "pruned+paper", "pruned+ours"}
    by = {(r["workload"], r["variant"]): r for r in result["rows"]}
    assert set(by) == {(w, v) for w in ("prefill 1x16", "decode b=2") for v in variants | {"op:ours", "op:paper"}}
    # Every variant generated the same number of tokens; decode samples = steps after warm-up.
    assert {by[("decode b=2", v)]["tokens_generated"] for v in variants} == {5}
    assert all(by[("decode b=2", v)]["samples"] == 5 - 1 - 2 for v in variants)
    for w in ("prefill 1x16", "decode b=2"):
        assert by[(w, "pruned")]["overhead_pct"] == 0.0
        assert all(by[(w, v)]["median_ms"] > 0 for v in variants)
        # The ops alone: a share of the pruned model's time (positive, and not a difference).
        assert all(0 < by[(w, op)]["overhead_pct"] for op in ("op:ours", "op:paper"))
    # The paper's hook (dense fp32 P) and our op apply the same map: same logits in fp32; and the
    # patch does change the pruned model's output.
    assert result["check"]["ours_vs_paper"] <= 1e-4
    assert result["check"]["ours_vs_pruned"] > 1e-2
    assert result["model"]["layers_after_pruning"] == result["model"]["layers"] - 2
    # The profiler found the patch op in every profiled decode step, and a share of the step's time.
    prof = result["profile"]["decode b=2"]
    assert prof["patch_calls_per_step"] == 1 and 0 < prof["patch_ops_share_pct"] < 100
    assert all(name.startswith("linearpatch") for name in prof["ops"])
    text = (tmp_path / "bench_e2e.txt").read_text()
    assert "pruned+ours" in text and "paper's hook" in text
    assert (tmp_path / "bench_e2e.png").exists() == _matplotlib()


def test_bench_e2e_variants_share_weights_and_leave_dense_intact():
    bench = _load("bench_e2e.py")
    preset = bench.PRESETS["tiny"]
    config = bench.build_config(preset, 64)
    with torch.no_grad():
        dense = bench.build_dense(config, torch.float32, torch.device("cpu"))
        before = {n: p.data_ptr() for n, p in dense.named_parameters()}
        scale = 0.5 + torch.rand(config.hidden_size)
        variants, p = bench.build_variants(dense, 3, 5, scale)
    # Pruning the copies did not touch the dense model: all layers, original indices, config.
    assert len(dense.model.layers) == 8 and dense.config.num_hidden_layers == 8
    assert [layer.self_attn.layer_idx for layer in dense.model.layers] == list(range(8))
    assert {n: q.data_ptr() for n, q in dense.named_parameters()} == before
    shared = set(before.values())
    for name in ("pruned", "pruned+paper", "pruned+ours"):
        model = variants[name]
        assert len(model.model.layers) == 6 and model.config.num_hidden_layers == 6
        weights = [q for n, q in model.named_parameters() if not n.endswith("patch.scale")]
        assert all(q.data_ptr() in shared for q in weights)
    assert not any(isinstance(layer, lp.PatchedDecoderLayer) for layer in variants["pruned"].model.layers)
    assert isinstance(variants["pruned+ours"].model.layers[2], lp.PatchedDecoderLayer)
    # P of the paper's hook is H diag(s) H^T (fp64 dense H, fp32 result).
    h = lp.hadamard_matrix(config.hidden_size)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p.double(), (h * scale.double()) @ h.T, rtol=0, atol=1e-6)


def test_multicut_benchmark_takes_the_cli_name_of_the_selection():
    """README points Block Influence users at `--selection block_influence`, the CLI's name; the benchmark
    that made its table takes it too, and its first name, --method, still works for the recorded command."""
    multicut = _load("multicut_smollm2.py")
    assert multicut.parse_args(["--selection", "block_influence"]).method == "block_influence"
    assert multicut.parse_args(["--method", "block_influence"]).method == "block_influence"
    assert multicut.parse_args([]).method == "cosine"


def test_bench_host_stub_keeps_the_cuda_runners_host_work(tmp_path):
    """bench_host's "public, cuda path": the cuda backend is chosen for a CPU tensor, its runner's host work
    runs (the prepared s / d and norm weight end up cached for the tensors of the run) and the CPU C++ op
    stands in for the launch; every op and variant gets a time."""
    from linearpatch_kernels.backends import cpu_backend, cuda_backend

    if not cpu_backend.load_library():
        pytest.skip(f"no C++ CPU kernels: {cpu_backend.load_error()}")
    bench = _load("bench_host.py")
    s, w = torch.rand(bench.D) + 0.5, torch.rand(bench.D) + 0.5
    stub = bench._stubbed_cuda_runner("patch_add_rmsnorm", torch.device("cpu"), bench.D)
    x = torch.randn(1, bench.D)
    h, normed = stub(x, x, s, w, 1e-6)
    assert h.shape == normed.shape == x.shape
    assert id(s) in cuda_backend._prepared and id(w) in cuda_backend._prepared  # the runner's host work ran
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--rounds", "2", "--calls", "3", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # the benchmark times one thread
    rows = {(r["op"], r["variant"]): r for r in result["rows"]}
    assert len(rows) == 15 and all(r["median_us"] > 0 for r in rows.values())
    assert (tmp_path / "bench_host.txt").read_text().startswith("Host cost per eager call")
