"""The prepared GPU run, checked without a GPU: the plan (steps, budgets, artifacts), the timing step's
dry run, the results writer on the first H200 run, the Triton cache's key and its move to another
machine, and the CUDA-graph decode's bookkeeping (its replays stood in by eager calls).

What needs a GPU (the timings themselves, graph capture, the sanitizer, the tests on the GPU) is the
run's own job; these tests keep the code that drives it from breaking in between.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "benchmarks" / "results" / "h200-2026-12-01"
STEP_ORDER = ["timings", "cuda-tests", "sanitizer", "e2e", "triton-tests", "jit"]  # the order of value


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


plan = _load("gpu_plan", REPO / "benchmarks" / "gpu_plan.py")
record = _load("gpu_record", REPO / "benchmarks" / "gpu_record.py")
triton_cache = _load("triton_cache", REPO / "scripts" / "triton_cache.py")


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


# ------------------------------------------------------------------------------------------------
# The plan


def test_plan_lists_every_step_with_its_budget_within_eight_minutes(tmp_path):
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--plan"], capture_output=True, text=True,
                         env=dict(_env(), GPU_BUNDLE=str(tmp_path / "none")), timeout=60, check=True).stdout
    listed = [line.split()[1] for line in out.splitlines() if line.strip()[:2] in {f"{i}." for i in range(1, 10)}]
    assert listed == STEP_ORDER
    p = plan.plan(tmp_path / "none")
    assert [s["name"] for s in p["steps"]] == STEP_ORDER
    assert all(s["budget_s"] > 0 for s in p["steps"])
    assert p["steps_total_s"] == p["setup_s"] + sum(s["budget_s"] for s in p["steps"]) <= 8 * 60
    for s in p["steps"]:
        assert f"{s['name']:<13} {s['budget_s']:>4} s" in out
    # every artifact is listed, and here (no bundle) as missing
    assert [a["name"] for a in p["artifacts"]] == ["wheel", "triton-cache", "sass-model", "fht"]
    for a in p["artifacts"]:
        assert a["found"] is False
        assert f"{a['name']:<13} missing" in out
    budgets = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_plan.py"), "--budgets"], capture_output=True,
                             text=True, check=True).stdout.split()
    assert budgets == [x for s in p["steps"] for x in (s["name"], str(s["budget_s"]))]


def test_plan_finds_a_bundle_and_tells_current_from_stale(tmp_path, monkeypatch):
    bundle = tmp_path / "bundle"
    (bundle / "wheel").mkdir(parents=True)
    (bundle / "wheel" / "linearpatch_kernels-0.1.0+cu130-cp310-abi3-manylinux_2_28_x86_64.whl").write_bytes(b"w")
    (bundle / "sass_model.json").write_text("[]")
    now = {a.name: plan.artifact_hash(a) for a in plan.ARTIFACTS}
    entries = {"wheel": dict(status="built", source_hash=now["wheel"], detail="w"),
               "sass-model": dict(status="built", source_hash="0" * 16, detail="s"),
               "fht": dict(status="missing", detail="no sources")}
    (bundle / "manifest.json").write_text(json.dumps({"artifacts": entries}))
    committed = tmp_path / "committed.json"
    committed.write_text(json.dumps({"artifacts": entries}))
    monkeypatch.setattr(plan, "COMMITTED_MANIFEST", committed)
    status = {a["name"]: a for a in plan.artifact_status(bundle)}
    assert status["wheel"]["found"] and status["wheel"]["committed"] == "current"
    assert status["sass-model"]["found"] and status["sass-model"]["committed"] == "stale"
    assert not status["triton-cache"]["found"] and status["triton-cache"]["committed"] == "not built"
    assert not status["fht"]["found"] and status["fht"]["committed"].startswith("not built")
    # a source file's content is part of the hash
    assert plan.source_hash(["benchmarks/gpu_plan.py"]) != plan.source_hash(["benchmarks/gpu_timings.py"])


def test_committed_manifest_lists_every_artifact():
    manifest = json.loads(plan.COMMITTED_MANIFEST.read_text())
    assert set(manifest["artifacts"]) == {a.name for a in plan.ARTIFACTS}
    assert manifest["total_bytes"] <= manifest["limit_bytes"] == 64 * 2**20
    for name, entry in manifest["artifacts"].items():
        assert entry["status"] in ("built", "missing"), (name, entry)
        assert entry["detail"]


def test_triton_launches_cover_every_timed_triton_case():
    launches = {(l["op"], l["dtype"], l["d"], l["rows"], l["other_h_k"]) for l in plan.triton_launches()}
    ops = {"patch": "hadamard_patch", "transform": "hadamard_transform", "epilogue": "patch_add_rmsnorm"}
    for g in plan.timing_groups():
        if g["phase"] == "sweep":
            continue
        for op in (("patch",) if g["phase"] == "other-h-k" else ops):
            assert (ops[op], g["dtype"], g["d"], g["rows"], g["phase"] == "other-h-k") in launches


# ------------------------------------------------------------------------------------------------
# The timing step's dry run and the record written from it


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dry")
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_timings.py"), "--out", str(out), "--dry-run"],
                   env=_env(), capture_output=True, text=True, timeout=300, check=True)
    return out


def test_timing_dry_run_checks_every_provider_against_fp64(dry_run):
    result = json.loads((dry_run / "gpu_timings.json").read_text())
    assert result["meta"]["dry_run"] and not result["errors"]
    # the commit of the kernels timed, which the speed model's backtest rebuilds: the bundle's, else
    # the checkout's HEAD
    manifest = REPO / ".gpu-bundle" / "manifest.json"
    expected = (json.loads(manifest.read_text())["commit"] if manifest.exists() else
                subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip())
    assert result["meta"]["commit"] == expected and expected
    timed = [r for r in result["rows"] if "median_ms" in r]
    kinds = {(r["impl"], r["op"]) for r in timed}
    assert {("copy", "copy"), ("cuda", "patch"), ("triton", "epilogue"), ("op", "patch"), ("dense-matmul", "patch"),
            ("paper-fp32", "patch"), ("fht-twice", "patch")} <= kinds
    for r in timed:
        assert len(r["rounds_ms"]) == plan.REPEATS and r["median_ms"] > 0
        copy = next(c for c in timed if (c["impl"], c["phase"], c["dtype"], c["d"], c["rows"], c["mode"])
                    == ("copy", r["phase"], r["dtype"], r["d"], r["rows"], r["mode"]))
        assert r["ratio_to_copy"] == pytest.approx(r["median_ms"] / copy["median_ms"])
        if r["impl"] != "copy":
            assert r["rel_error"] <= 2e-2  # bf16/fp16 against the fp64 reference
    # decode groups ask for CUDA-graph replays; on the CPU those rows say why they are absent
    assert any(r.get("skipped") == "CPU: no CUDA graphs" and r["rows"] == 1 for r in result["rows"])
    assert {g["phase"] for g in result["groups"]} == {"core", "sweep"}


def test_record_from_a_dry_run(dry_run, tmp_path):
    (dry_run / "steps.json").write_text(json.dumps([dict(name="timings", status="passed", seconds=9,
                                                         triton_kernels_compiled_here=0)]))
    out = tmp_path / "record"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_record.py"), "--run", str(dry_run), "--out", str(out),
                    "--date", "2030-01-02", "--command", "OUT=x bash benchmarks/gpu_check.sh"],
                   env=_env(), check=True, capture_output=True, text=True, timeout=120)
    rec = json.loads((out / "record.json").read_text())
    assert rec["format"] == record.FORMAT and rec["commands"] == ["OUT=x bash benchmarks/gpu_check.sh"]
    assert rec["steps"][0]["name"] == "timings"
    assert any(r["impl"] == "cuda" and r.get("median_us") for r in rec["kernels"])
    assert any(r["impl"] == "paper-fp32" for r in rec["comparisons"])
    assert "| timings | passed | 9 | 0 |" in (out / "table.md").read_text()
    # an earlier record of another kind of GPU is refused; of the same kind, its ratios stand beside
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    row = next(r for r in rec["kernels"] if r.get("ratio_to_copy"))
    for gpu, ok in (("NVIDIA H100 80GB HBM3", False), (rec["gpu"], True)):
        (earlier / "record.json").write_text(json.dumps(dict(gpu=gpu, slug="x-2029-01-01", kernels=[dict(row, ratio_to_copy=9.5)])))
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_record.py"), "--run", str(dry_run), "--out",
                               str(tmp_path / "again"), "--date", "2030-01-02", "--previous", str(earlier)],
                              env=_env(), capture_output=True, text=True, timeout=120)
        assert (proc.returncode == 0) == ok, proc.stderr
        if not ok:
            assert "same kind of GPU" in proc.stderr
    again = json.loads((tmp_path / "again" / "record.json").read_text())
    match = [r for r in again["kernels"] if r.get("previous_ratio") is not None]
    assert len(match) == 1 and match[0]["previous_ratio"] == 9.5


# ------------------------------------------------------------------------------------------------
# The first H200 run in the record format


def test_first_run_record_is_the_committed_one(tmp_path):
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_record.py"), "--legacy", str(RECORD), "--out",
                    str(tmp_path)], env=_env(), check=True, capture_output=True, text=True, timeout=120)
    fresh = json.loads((tmp_path / "record.json").read_text())
    assert fresh == json.loads((RECORD / "record.json").read_text())
    assert (tmp_path / "table.md").read_text() == (RECORD / "table.md").read_text()


def test_first_run_measured_beside_the_model_of_its_kernels():
    rec = json.loads((RECORD / "record.json").read_text())
    assert rec["gpu"] == "NVIDIA H200" and rec["machine"]["driver_version"] == "580.159.04"
    assert rec["machine"]["clocks_max_sm"] == "1980"
    cuda_patch = next(r for r in rec["kernels"] if (r["impl"], r["op"], r["d"], r["rows"]) == ("cuda", "patch", 4096, 16384))
    # the numbers of the run's README: 113 us, 1.68x a copy, the model of its kernels 1.00x
    assert cuda_patch["median_us"] == pytest.approx(113.33, abs=0.01)
    assert cuda_patch["ratio_to_copy"] == pytest.approx(1.682, abs=1e-3)
    assert cuda_patch["model_run"]["ratio"] == 1.0 and cuda_patch["model_run"]["kernel"] == "row_kernel<bf16,12,1>"
    assert cuda_patch["model_error"] == pytest.approx(0.682, abs=1e-3)
    k20 = next(r for r in rec["kernels"] if (r["impl"], r["op"], r["d"]) == ("cuda", "patch", 5120))
    assert k20["model_run"]["ratio"] == 1.09 and k20["ratio_to_copy"] == pytest.approx(2.44, abs=0.01)
    # Triton kernels of that run have no model of their own (today's is shown as the prediction)
    assert all("model_run" not in r for r in rec["kernels"] if r["impl"] == "triton")
    table = (RECORD / "table.md").read_text()
    assert "| cuda | patch | bfloat16 | 4096 | 16384 | 113.3 | 67.4 | 1.68 | 1.00 | +68 % |" in table
    for png in ("copy_ratio.png", "decode.png"):
        assert (RECORD / png).stat().st_size > 10_000


def test_a_new_run_is_compared_with_the_latest_record_of_its_gpu_only():
    assert record.latest_record("NVIDIA H200", "h200-2027-01-15") == RECORD
    assert record.latest_record("NVIDIA H200", "h200-2026-12-01") is None  # not with itself or later runs
    assert record.latest_record("NVIDIA H100 80GB HBM3", "h100-2027-01-15") is None


def test_model_rows_reads_the_json_the_table_and_the_triton_report():
    rows = record.model_rows(REPO / "benchmarks" / "results" / "sass-budget" / "budget.json")
    index = record.model_index(rows)
    assert index[("cuda", "hadamard_patch", "bfloat16", 4096)]["kernel"].startswith("row_kernel")
    table = record.model_rows(RECORD / "sass_model.txt")
    assert record.model_index(table)[("cuda", "hadamard_patch", "bfloat16", 5120)]["ratio"] == 1.09
    assert any(r["lower_bound"] for r in table)  # ">=1.00" rows of kron_kernel
    tri = record.model_rows(REPO / "benchmarks" / "results" / "triton-aot" / "triton-3.6" / "report.json")
    assert tri and {r["backend"] for r in tri} == {"triton"} and {r["gpu"] for r in tri} == {"H200", "A100"}


# ------------------------------------------------------------------------------------------------
# Triton's cache key and the cache's move


def test_key_of_tree_is_tritons_own_key():
    import triton
    from triton.runtime.cache import triton_key

    assert triton_cache.key_of_tree(Path(triton.__file__).parent, triton.__version__) == triton_key()


def test_install_points_group_files_at_the_new_folder_and_rekeys(tmp_path):
    old_key, rest = "3.6.0-aaa", "-srchash-backend-options-[]"
    src = tmp_path / "bundle"
    name = triton_cache.dir_name(old_key + rest)
    assert name == base64.b32encode(hashlib.sha256((old_key + rest).encode()).digest()).decode().rstrip("=")
    entry = src / name
    entry.mkdir(parents=True)
    (entry / "k.cubin").write_bytes(b"\x7fELF")
    (entry / "k.json").write_text(json.dumps({"hash": "old", "name": "k"}))
    (entry / "__grp__k.json").write_text(json.dumps({"child_paths": {
        "k.cubin": "/elsewhere/k.cubin", "k.json": "/elsewhere/k.json", "k.ptx": "/elsewhere/k.ptx"}}))
    (src / "entries.json").write_text(json.dumps({"triton": "3.6.0", "triton_key": triton_cache.short(old_key),
                                                  "entries": {name: {"key_rest": rest}}}))
    same = triton_cache.install(src, tmp_path / "same", local_key=old_key)
    assert not same["rekeyed"] and (tmp_path / "same" / name / "k.cubin").is_file()
    group = json.loads((tmp_path / "same" / name / "__grp__k.json").read_text())["child_paths"]
    assert group == {"k.cubin": str(tmp_path / "same" / name / "k.cubin"), "k.json": str(tmp_path / "same" / name / "k.json")}
    new_key = "3.6.0-bbb"
    moved = triton_cache.install(src, tmp_path / "moved", local_key=new_key)
    new_name = triton_cache.dir_name(new_key + rest)
    assert moved["rekeyed"] and list(moved["entries"]) == [new_name]
    meta = json.loads((tmp_path / "moved" / new_name / "k.json").read_text())
    assert meta["hash"] == hashlib.sha256((new_key + rest).encode()).hexdigest()
    group = json.loads((tmp_path / "moved" / new_name / "__grp__k.json").read_text())["child_paths"]
    assert all(Path(p).parent == tmp_path / "moved" / new_name and Path(p).is_file() for p in group.values())


def test_a_warmed_cache_hits_after_its_move(tmp_path):
    """One launch through the backend's launcher under the sm_90 stand-in driver (installed triton):
    compiled into the bundle's layout, then replayed by ``verify`` against a moved copy: one hit, no
    miss, nothing compiled anew; and the prefill model of the kernel beside the cache."""
    launch = [dict(op="hadamard_patch", dtype="bfloat16", d=4096, rows=16384, weight="bfloat16", other_h_k=False)]
    (tmp_path / "launches.json").write_text(json.dumps(launch))
    env = dict(_env(), TRITON_CACHE_DIR=str(tmp_path / "triton-home"))
    env.pop("TRITON_INTERPRET", None)
    tool = str(REPO / "scripts" / "triton_cache.py")
    subprocess.run([sys.executable, tool, "warm", "--out", str(tmp_path / "b" / "triton-cache"), "--launches",
                    str(tmp_path / "launches.json")], env=env, check=True, capture_output=True, text=True, timeout=300)
    info = json.loads((tmp_path / "b" / "triton-cache" / "entries.json").read_text())
    assert len(info["entries"]) == 1 and info["launches"][0]["misses"] == 1 and info["env_vars"] == {}
    (entry,) = info["entries"].values()
    assert sorted(entry["files"]) == ["__grp___hadamard_kernel.json", "_hadamard_kernel.cubin", "_hadamard_kernel.json"]
    verify = subprocess.run([sys.executable, tool, "verify", "--cache", str(tmp_path / "b" / "triton-cache"), "--launches",
                             str(tmp_path / "launches.json")], env=env, capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0 and "1 hits, 0 misses, 0 entries compiled anew" in verify.stdout, verify.stdout
    (model,) = json.loads((tmp_path / "b" / "triton_model.json").read_text())["rows"]
    assert model["target"] == "sm_90" and model["model"]["gpu"] == "H200" and model["model"]["ratio"] >= 1.0


# ------------------------------------------------------------------------------------------------
# End to end under CUDA graphs: the bookkeeping of the static token and position


def test_graph_decode_generates_the_eager_tokens(monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_e2e as b

    # A capture that runs the step eagerly and a replay that runs it again: what a graph replays, minus
    # the GPU. The static input, position and output must carry the decode as the eager loop does.
    monkeypatch.setattr(b, "graph_capture", lambda fn, device: (fn(), fn)[1])
    device = torch.device("cpu")
    config = b.build_config(b.PRESETS["tiny"], 64)
    with torch.no_grad():
        dense = b.build_dense(config, torch.float32, device)
        variants, p = b.build_variants(dense, 5, 7, 0.5 + torch.rand(config.hidden_size))
        ops = b.patch_ops(variants, p)
    with torch.inference_mode():
        new_tokens = b.DECODE_WARMUP_STEPS + 3
        _, _, generated, tokens = b.decode_samples(variants, ops, 2, 8, new_tokens, 1, "static", device,
                                                   config.vocab_size, torch.float32)
        steps, graph_generated, agree = b.decode_graph_samples(variants, ops, 2, 8, new_tokens, "static", device,
                                                               config.vocab_size, torch.float32, tokens)
        prefill = b.prefill_graph_samples(variants, ops, torch.randint(3, config.vocab_size, (1, 8)),
                                          torch.randn(1, 8, config.hidden_size), 1, device)
    assert graph_generated == generated == {name: new_tokens for name in variants}
    assert agree == {name: 1.0 for name in variants}
    assert all(len(v) == new_tokens - 1 - b.DECODE_WARMUP_STEPS for v in steps.values())
    assert set(prefill) == {*variants, *ops} and all(len(v) == 1 for v in prefill.values())
    with pytest.raises(SystemExit):
        b.parse_args(["--device", "cpu", "--cuda-graph"])
