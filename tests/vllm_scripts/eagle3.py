"""EAGLE-3 speculative decoding of a LinearPatch checkpoint (run by tests/test_vllm.py in the vLLM
environment):

    python eagle3.py CHECKPOINT DRAFT OUT.pt --prompt '[1, 2, 3]' --max-tokens 8

Greedy generation with the EAGLE-3 draft in DRAFT; saves ``{"tokens": [...], "aux": tensor}`` where
``aux`` is what the draft received as the target's auxiliary hidden states for the prompt (the input
of its ``combine_hidden_states``: the states at the draft config's ``eagle_aux_hidden_state_layer_ids``,
concatenated, one row per prompt token).
"""

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("draft")
    parser.add_argument("out")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()

    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

    captured = []
    combine = Eagle3LlamaForCausalLM.combine_hidden_states

    def recording_combine(self, hidden_states):
        captured.append(hidden_states.detach().float().cpu().clone())
        return combine(self, hidden_states)

    # The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the class patch reaches it.
    Eagle3LlamaForCausalLM.combine_hidden_states = recording_combine
    llm = LLM(model=args.checkpoint, dtype="float32", enforce_eager=True, max_model_len=128, skip_tokenizer_init=True,
              seed=0, gpu_memory_utilization=0.08,
              speculative_config={"method": "eagle3", "model": args.draft, "num_speculative_tokens": 2})
    captured.clear()  # only what the prompt's generation records
    prompt = json.loads(args.prompt)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, detokenize=False)
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
    torch.save({"tokens": list(out[0].outputs[0].token_ids), "aux": captured[0][: len(prompt)]}, args.out)


if __name__ == "__main__":
    main()
