"""llm-compressor's own ``oneshot`` GPTQ, run by ``scripts/bench_compressed.py`` in llm-compressor's venv.

Never imports quantsink (llm-compressor pins transformers <= 5.17 and compressed-tensors 0.19, so
it lives in an environment of its own). Quantizes ``--model`` with ``GPTQModifier`` on exactly
the calibration windows in ``--windows`` (a LongTensor ``[N, L]`` saved with ``torch.save``),
with the ``config_groups`` of ``--config-groups`` (a JSON file: the ``config_groups`` of the
quantsink checkpoint it is compared with, so both quantize the same layers with the same group
sizes) and llm-compressor's defaults otherwise (min-max observer, ``actorder`` static,
dampening 0.01, block 128), and saves the compressed checkpoint to ``--out``.

    /work/venv-llmc/bin/python scripts/llmc_oneshot.py --model DIR --windows w.pt \
        --config-groups groups.json --out OUT
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--windows", required=True)
    p.add_argument("--config-groups", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    windows = torch.load(args.windows)  # [N, L] token ids
    groups = json.loads(open(args.config_groups).read())
    groups = {name: {"targets": g["targets"], "weights": g["weights"]} for name, g in groups.items()}
    data = Dataset.from_dict({"input_ids": windows.tolist(),
                              "attention_mask": torch.ones_like(windows).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    t0 = time.perf_counter()
    oneshot(model=model, processor=tok, dataset=data,
            recipe=GPTQModifier(config_groups=groups, ignore=["lm_head"]),
            max_seq_length=windows.shape[1], num_calibration_samples=windows.shape[0],
            output_dir=args.out)
    print(json.dumps({"llmcompressor_seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
