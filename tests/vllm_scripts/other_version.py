"""vLLM with the plugin installed, pretending to be another vLLM version (run by tests/test_vllm.py
in the vLLM environment):

    python other_version.py VERSION PLAIN_CHECKPOINT PRUNED_CHECKPOINT

With ``vllm.__version__`` set to VERSION before vLLM loads its plugins, the plugin must leave vLLM
working: the plain checkpoint generates, the pruned one is refused as an unknown architecture (never
run without its patch). Prints ``REPORT {...}``.
"""

import json
import sys


def main() -> None:
    version, plain, pruned = sys.argv[1:4]
    import vllm

    vllm.__version__ = version
    from vllm import LLM, ModelRegistry, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    report = {"registered": sorted(a for a in ModelRegistry.get_supported_archs() if a.startswith("LinearPatch"))}
    common = dict(dtype="float32", enforce_eager=True, max_model_len=64, skip_tokenizer_init=True, seed=0,
                  gpu_memory_utilization=0.05)
    llm = LLM(model=plain, **common)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, detokenize=False)
    report["plain_tokens"] = list(llm.generate([TokensPrompt(prompt_token_ids=[5, 6, 7])], params,
                                               use_tqdm=False)[0].outputs[0].token_ids)
    del llm
    try:
        LLM(model=pruned, **common)
        report["pruned"] = "LOADED"
    except Exception as e:  # noqa: BLE001  (the refusal is the result)
        report["pruned"] = f"{type(e).__name__}: {e}"
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
