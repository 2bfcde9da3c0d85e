"""The ahead-of-time compile check (``scripts/triton_aot.py``): a small matrix compiled for real
targets, and the verdicts it gives. CI runs the whole matrix (``.ci/triton_aot.sh``)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[1]
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
needs_toolchain = pytest.mark.skipif(not CUOBJDUMP.is_file(), reason="this triton wheel ships no cuobjdump")


def _script():
    # The script unsets TRITON_INTERPRET at import (it compiles the real kernels); the interpreter
    # tests that run after this one in the same process still need it.
    saved = os.environ.get("TRITON_INTERPRET")
    try:
        spec = importlib.util.spec_from_file_location("triton_aot", ROOT / "scripts" / "triton_aot.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return module


@needs_toolchain
def test_small_matrix_compiles_without_spills_within_the_estimate(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "linearpatch_kernels", "triton-aot"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "triton_aot.py"), "--out", str(tmp_path),
                           "--sizes", "252,576,896", "--dtypes", "bf16", "--ops", "hadamard_patch", "--jobs", "1"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["meta"]["failures"] == []
    rows = report["rows"]
    assert {(r["target"], r["regime"]) for r in rows if r["d"] == 576} == {
        (t, g) for t in ("sm_80", "sm_86", "sm_90") for g in ("decode", "prefill")}
    for r in rows:
        if r["d"] == 252:  # 252 x 1: H_252 padded to 256 x 256 does not fit on chip
            assert "H_252" in r["refused"]
            continue
        assert r["local_bytes"] == 0 and r["sass"]["STL"] == 0 and r["sass"]["LDL"] == 0
        assert 0 < r["shared_bytes"] <= min(r["estimate_shared_bytes"], r["limit"])
        assert r["registers"] <= 255 and r["sass_total"] > 0
        if r["d"] == 576:  # 36 x 16: H_36 as the +-1 add network (NETWORK_PREFERRED), unpadded, no tensor cores
            assert r["config"]["NETWORK"] and r["config"]["K_PAD"] == 36
            assert r["sass"]["HMMA"] + r["sass"]["HGMMA"] == 0 and r["sass"]["FADD"] > 0
            continue
        # 896 = 28 x 32: H_28 padded to 32 on tensor cores: mma.sync on sm_80, mma.sync or wgmma on sm_90.
        assert not r["config"]["NETWORK"] and r["config"]["K_PAD"] == 32
        assert r["sass"]["HMMA"] + r["sass"]["HGMMA"] > 0
        # The pipelined row-block loop: the next block's loads are cp.async copies (LDGSTS).
        assert r["config"]["STAGES"] == 2 and r["sass"]["LDGSTS"] > 0
        # The prefill model: one row-block iteration's SASS, a ratio to a copy of at least 1.
        if r["regime"] == "prefill" and r["target"] != "sm_86":
            assert r["model"]["ratio"] >= 1.0 and r["model"]["bound"] in ("issue", "shuffle", "shared", "hbm")
    assert "| sm_90 | hadamard_patch | bf16 | 576 | prefill |" in (tmp_path / "report.md").read_text()


def test_verdicts_flag_spills_and_shared_memory():
    problems = _script()._problems
    ok = {"target": "sm_86", "limit": 101_376, "estimate_shared_bytes": 65_536, "shared_bytes": 65_536,
          "local_bytes": 0, "sass": {"LDL": 0, "STL": 0}}
    assert problems(ok) == []
    assert "spills" in problems({**ok, "local_bytes": 96, "sass": {"LDL": 3, "STL": 3}})[0]
    over = problems({**ok, "shared_bytes": 131_072, "estimate_shared_bytes": 140_000})
    assert over == ["shared memory 131072 B over the 101376 B of sm_86"]
    assert "over the backend's estimate" in problems({**ok, "shared_bytes": 70_000})[0]
    assert problems({**ok, "error": "OutOfResources: shared memory"}) == ["compile error OutOfResources: shared memory"]


def test_plan_compiles_the_add_network_where_the_padded_dot_cannot_run():
    rows = _script().plan([9216, 18432], ["bf16"], ["hadamard_patch"])
    by_d = {d: [r for r in rows if r["d"] == d] for d in (9216, 18432)}
    assert by_d[9216] and all("refused" not in r and r["config"]["NETWORK"] for r in by_d[9216])
    assert all(r["config"]["K_PAD"] == 36 and r["estimate_shared_bytes"] == 4 * 32 * 256 for r in by_d[9216])
    assert by_d[18432] and all("18432 values per row" in r["refused"] for r in by_d[18432])


def test_ci_compiles_the_add_network_sizes_in_bf16_only():
    # .ci/triton_aot.sh splits the matrix with this list: 9216 (the dot cannot hold it), 576 and 2304 (preferred).
    assert _script().network_sizes() == [576, 2304, 9216]


def test_plan_follows_the_backends_choice_per_architecture():
    rows = _script().plan([576, 2304, 5120], ["bf16"], ["hadamard_patch"])
    network = {(r["target"], r["d"]) for r in rows if r["config"]["NETWORK"]}
    assert network == {("sm_80", 576), ("sm_86", 576), ("sm_90", 576), ("sm_80", 2304), ("sm_86", 2304)}
    assert all("refused" not in r for r in rows)
