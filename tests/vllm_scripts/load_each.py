"""Load each of several checkpoints with vLLM (run by tests/test_vllm.py in the vLLM environment):

    python load_each.py '{"name": "/path/to/checkpoint", ...}' ['{"name": {extra LLM arguments}}']

prints ``RESULTS {"name": "LOADED" | "ExceptionType: message", ...}``. One process for all of them:
each refusal comes before the engine runs, and the engine of a loaded one is dropped before the next.
"""

import gc
import json
import sys


def main() -> None:
    from vllm import LLM

    paths = json.loads(sys.argv[1])
    extra = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    results = {}
    for name, path in paths.items():
        try:
            kwargs = dict(dtype="float32", enforce_eager=True, max_model_len=64, skip_tokenizer_init=True, seed=0,
                          gpu_memory_utilization=0.05)
            llm = LLM(model=path, **{**kwargs, **extra.get(name, {})})
            results[name] = "LOADED"
            del llm
            gc.collect()
        except Exception as e:  # noqa: BLE001  (the message is the result)
            results[name] = f"{type(e).__name__}: {e}"
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
