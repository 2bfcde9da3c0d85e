"""Greedy generation with vLLM, run as a subprocess by tests/test_vllm.py in the vLLM environment.

    python generate.py CHECKPOINT OUT.json --prompts '[[1, 2, 3], ...]' --max-tokens 8 [--tp 2] [--pp 2]
        [--compile] [--prefix-caching]

Writes ``{"tokens": [[...], ...], "cuts": [...], "cached_tokens": [...]}`` (``cuts``: how the plugin runs
each cut, when the checkpoint is patched and the engine runs in this process; ``cached_tokens``: each
prompt's prefix-cache hits).
"""

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="vLLM's torch.compile mode instead of eager")
    parser.add_argument("--prefix-caching", action="store_true",
                        help="blocks of 32 tokens, the prompts one at a time, so later ones hit the prefix cache")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    caching = {"enable_prefix_caching": True, "block_size": 32} if args.prefix_caching else {}
    llm = LLM(model=args.checkpoint, dtype=args.dtype, enforce_eager=not args.compile, max_model_len=args.max_model_len,
              tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, skip_tokenizer_init=True, seed=0,
              gpu_memory_utilization=0.08, **caching)  # on the CPU backend: the share of RAM for the KV cache
    prompts = [TokensPrompt(prompt_token_ids=p) for p in json.loads(args.prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, detokenize=False)
    if args.prefix_caching:
        outputs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]

    def cuts(model):
        return getattr(model, "linearpatch_cuts", None)

    try:
        notes = llm.apply_model(cuts)
    except Exception as e:  # apply_model needs the engine in this process; the tokens are the result
        notes = [f"unavailable: {type(e).__name__}"]
    with open(args.out, "w") as f:
        json.dump({"tokens": tokens, "cuts": notes, "cached_tokens": [o.num_cached_tokens for o in outputs]}, f)


if __name__ == "__main__":
    main()
