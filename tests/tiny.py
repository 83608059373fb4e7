"""Tiny random models of each family (hidden 32, 2 layers) for fast unit tests."""

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)


def tiny_bert(num_labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


def tiny_llama(lm: bool = False):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=0, num_labels=2,
    )
    return (LlamaForCausalLM(config) if lm else LlamaForSequenceClassification(config)).eval()


def tiny_vit(num_labels: int = 3) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=num_labels,
    )
    return ViTForImageClassification(config).eval()



def token_batch(batch: int = 3, seq: int = 7, vocab: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask}
