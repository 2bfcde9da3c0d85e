#!/usr/bin/env bash
# Times the commands of README's "Install and run", "Command line" and "Several cuts" sections on the
# embedded default model (converted once beforehand), one after another, in a scratch folder, and the
# README's Python blocks (tests/test_readme.py). Prints each command with its wall and CPU times and the
# load average before and after it (the machine may be shared: say so next to the numbers).
#
#     bash benchmarks/readme_commands.sh [SCRATCH_FOLDER] [--paper]
#
# --paper also times the paper's calibration windows (--samples 128 --seqlen 2048, about an hour on
# two CPU cores) for the two-cut example, and scores both versions of it.
# LINEARPATCH: how to call the command (default: linearpatch; e.g. "python -m linearpatch_cli").
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
scratch=${1:-readme-commands}
paper=${2:-}
lp=${LINEARPATCH:-linearpatch}
mkdir -p "$scratch"
cd "$scratch" || exit 1

run() {  # run COMMAND...: the command, its exit status, wall/user/system seconds, load before and after
    echo "::: $*"
    echo "::: load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    /usr/bin/time -f "::: exit %x, wall %e s, user %U s, system %S s" "$@"
    echo "::: load after: $(cut -d' ' -f1-3 /proc/loadavg)"
}

echo "::: $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, $(python -c 'import torch; print("torch", torch.__version__, "threads", torch.get_num_threads())'), commit $(git -C "$root" rev-parse --short HEAD)"
run $lp demo
run $lp prune --model default --num-prune 5 --samples 16 --seqlen 512 --out smollm2-p5
run $lp eval --model smollm2-p5 --dense-model default --seqlen 512 --samples 2
run $lp eval --model smollm2-p5 --dense-model default --tasks arc_easy,hellaswag
run $lp distill --model smollm2-p5 --teacher default --train s --samples 32 --val-samples 4 --seqlen 512 --out smollm2-p5-s
run $lp prune --model default --blocks 14:17,20:23 --out smollm2-2cuts
run $lp prune --model default --num-prune 6 --max-cuts 2 --out smollm2-sel
run $lp eval --model smollm2-2cuts --seqlen 512 --samples 2
run $lp eval --model smollm2-sel --seqlen 512 --samples 2
if [ "$paper" = "--paper" ]; then
    run $lp prune --model default --blocks 14:17,20:23 --samples 128 --seqlen 2048 --out smollm2-2cuts-paper
    run $lp eval --model smollm2-2cuts-paper --seqlen 512 --samples 2
fi
cd "$root" && run python -m pytest -q -p no:cacheprovider tests/test_readme.py -k python_block --durations=0
