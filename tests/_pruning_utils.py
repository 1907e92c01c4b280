"""Tiny models and data for the pruning tests (CPU, seconds)."""

import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(cfg)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


class ToyClassification(torch.utils.data.Dataset):
    """Sequences whose label is (first token) % 3: learnable in a few steps."""

    def __init__(self, n=64, seq=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(1, 64, (n, seq), generator=g)
        self.y = self.x[:, 0] % 3

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": self.y[i]}
