"""Atomic writes: a save killed midway (a real SIGKILL of a subprocess) leaves no loadable half checkpoint,
an overwrite killed midway leaves the old checkpoint intact, an exception removes the staging folder."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from linearpatch_kernels import load_pruned, prune_and_patch, save_pruned
from linearpatch_kernels.atomic_files import atomic_directory, atomic_write_text, check_new_directory
from linearpatch_kernels.model import pruning_cuts

ROOT = Path(__file__).resolve().parents[1]

# The child saves a pruned tiny model; every safetensors file it writes is followed by a long sleep,
# so the parent can kill it while the checkpoint is half written (weights on disk, metadata not yet).
SLOW_SAVE = textwrap.dedent("""
    import sys, time
    import safetensors.torch
    import torch
    sys.path.insert(0, {tests!r})
    from tiny_models import tiny_model
    from linearpatch_kernels import prune_and_patch, save_pruned

    real_save_file = safetensors.torch.save_file
    def slow_save_file(*args, **kwargs):
        real_save_file(*args, **kwargs)
        print("WROTE", args[1] if len(args) > 1 else kwargs.get("filename"), flush=True)
        time.sleep(600)
    safetensors.torch.save_file = slow_save_file
    import transformers.modeling_utils as mu
    if hasattr(mu, "safe_save_file"):
        mu.safe_save_file = slow_save_file
    model = prune_and_patch(tiny_model("llama", num_layers=6, hidden_size=64, seed=3), 2, 4,
                            torch.full((64,), 1.5))
    save_pruned(model, {target!r}, overwrite={overwrite!r})
    print("DONE", flush=True)
""")


def kill_during_save(target: Path, overwrite: bool) -> None:
    script = SLOW_SAVE.format(tests=str(ROOT / "tests"), target=str(target), overwrite=overwrite)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        line = ""
        while time.monotonic() < deadline:
            line = child.stdout.readline()
            if line.startswith("WROTE") or not line:
                break
        assert line.startswith("WROTE"), f"the child never wrote a file: {line!r} {child.stderr.read()}"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL


def test_killed_save_leaves_nothing_loadable(tmp_path):
    target = tmp_path / "ckpt"
    kill_during_save(target, overwrite=False)
    assert not target.exists()  # the target never appears half written
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.partial-")]
    assert len(partial) == 1 and any(partial[0].iterdir())  # the half-written files sit in the hidden staging folder
    with pytest.raises(FileNotFoundError):
        load_pruned(target)

    # The next save to the same target removes what the killed process left, and succeeds.
    model = prune_and_patch(tiny_model("llama", num_layers=6, hidden_size=64, seed=3), 2, 4, torch.full((64,), 1.5))
    save_pruned(model, target)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_pruned(target)(input_ids=ids).logits, model(input_ids=ids).logits)


def test_killed_overwrite_keeps_the_old_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    old = prune_and_patch(tiny_model("llama", num_layers=6, hidden_size=64, seed=8), 1, 3, torch.full((64,), 0.7))
    save_pruned(old, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    kill_during_save(target, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    reloaded = load_pruned(target)
    assert pruning_cuts(reloaded.config.linearpatch)[0]["start"] == 1
    assert torch.equal(reloaded.model.layers[0].self_attn.q_proj.weight, old.model.layers[0].self_attn.q_proj.weight)


def test_exception_inside_removes_the_staging_folder(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as staging:
            (staging / "half.bin").write_bytes(b"x" * 100)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_and_refusal_keeps(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty.*pass overwrite=True to replace"):
        with atomic_directory(target):
            pass
    assert (target / "notes.txt").read_text() == "mine"
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old folder is gone, no leftovers


def test_check_new_directory_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is an existing file"):
        check_new_directory(tmp_path / "file")
    with pytest.raises(ValueError, match="contains the model"):
        check_new_directory(tmp_path, overwrite=True, inputs=[("model", tmp_path / "model")])
    with pytest.raises(ValueError, match="is the model"):
        check_new_directory(tmp_path / "m", overwrite=True, inputs=[("model", tmp_path / "m")])
    for empty in ("", " "):
        with pytest.raises(ValueError, match="output folder is an empty path"):
            check_new_directory(empty)
    if Path("/proc/self").is_dir():
        with pytest.raises(OSError, match="cannot write the output folder /proc/x"):
            check_new_directory("/proc/x")
    assert check_new_directory(tmp_path / "a" / "b") == tmp_path / "a" / "b"  # parents are created, the target not
    assert not (tmp_path / "a" / "b").exists()


def test_atomic_write_text(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_text(path, json.dumps({"a": 1}))
    atomic_write_text(path, json.dumps({"a": 2}))
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_an_output_inside_an_input_is_refused(tmp_path):
    """Writing into an input's folder changes the input as surely as replacing it: refused like "is" and
    "contains", whatever ``overwrite`` says, and before anything is created."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    before = sorted(p.name for p in model.iterdir())
    for out in (model / "sub", model / "a" / "b", model / "." / "sub"):
        for overwrite in (False, True):
            with pytest.raises(ValueError, match=r"is inside the model .*an input is never overwritten or written "
                                                 r"into"):
                check_new_directory(out, overwrite, inputs=[("model", model)])
    assert sorted(p.name for p in model.iterdir()) == before  # no parent folder was created inside the input
    link = tmp_path / "link"
    link.symlink_to(model)
    with pytest.raises(ValueError, match="is inside the model"):
        check_new_directory(link / "sub", inputs=[("model", model)])  # through a symbolic link too
    assert check_new_directory(tmp_path / "model-out", inputs=[("model", model)]) == tmp_path / "model-out"
    text = tmp_path / "texts" / "a.txt"
    text.parent.mkdir()
    text.write_text("x")
    with pytest.raises(ValueError, match="contains the text"):
        check_new_directory(tmp_path / "texts", True, inputs=[("text", text)])


@pytest.fixture
def umask():
    """Set the process umask for one test and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077], ids=["022", "002", "077"])
def test_saved_files_have_the_permissions_of_an_ordinary_write(tmp_path, umask, mask):
    """safetensors writes its file 0o600 whatever the umask; a checkpoint must be as readable as any file
    the user writes: 0o666 & ~umask for files, 0o777 & ~umask for folders."""
    umask(mask)
    model = tiny_model("llama", num_layers=4, hidden_size=64)
    prune_and_patch(model, 1, 2, torch.rand(64) + 0.5)
    save_pruned(model, tmp_path / "ckpt")
    atomic_write_text(tmp_path / "results.json", "{}")
    files = [p for p in (tmp_path / "ckpt").rglob("*") if p.is_file()] + [tmp_path / "results.json"]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o666 & ~mask) for p in files}
    assert oct((tmp_path / "ckpt").stat().st_mode & 0o777) == oct(0o777 & ~mask)
