"""Tiny P-MNER configs and inputs in the transformers ModelTester way (hidden 32, 2 layers, 4 heads, ~100 tokens), and
rows for a Trainer whose micro-batches hold different numbers of labelled tokens."""

import torch
from transformers import BertTokenizer

from fixtures import TINY_BERT, VOCAB
from modeling_pmner import PMNERConfig
from modeling_pmner.modeling_pmner import resolve_label_word_ids


class PMNERModelTester:
    """Builds tiny P-MNER configs and inputs (hidden 32, 2 layers, 4 heads, ~100 tokens)."""

    batch_size = 3
    seq_length = 9
    num_objects = 4
    visual_feature_dim = 16

    def text_config(self) -> dict:
        return dict(model_type="bert", **TINY_BERT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    def get_config(self, label_word_ids=True, **kwargs) -> PMNERConfig:
        config = PMNERConfig(
            text_config=self.text_config(),
            visual_feature_dim=self.visual_feature_dim,
            max_objects=5,
            fusion_num_heads=4,
            fusion_intermediate_size=40,
            fusion_dropout=0.0,
            **kwargs,
        )
        if label_word_ids:
            tokenizer = BertTokenizer(vocab={token: index for index, token in enumerate(VOCAB)})
            config.label_word_ids = resolve_label_word_ids(config.verbalizer, tokenizer)
        return config

    def get_inputs(self, with_visual=True, with_labels=True, num_labels=9) -> dict:
        generator = torch.Generator().manual_seed(0)
        inputs = {
            "input_ids": torch.randint(5, len(VOCAB), (self.batch_size, self.seq_length), generator=generator),
            "attention_mask": torch.ones(self.batch_size, self.seq_length, dtype=torch.long),
            "token_type_ids": torch.zeros(self.batch_size, self.seq_length, dtype=torch.long),
        }
        inputs["attention_mask"][1, -3:] = 0
        if with_visual:
            inputs["visual_features"] = torch.randn(
                self.batch_size, self.num_objects, self.visual_feature_dim, generator=generator
            )
            inputs["visual_mask"] = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
        if with_labels:
            labels = torch.randint(0, num_labels, (self.batch_size, self.seq_length), generator=generator)
            labels[:, 0] = -100
            inputs["labels"] = labels
        return inputs


tester = PMNERModelTester()


class Rows(torch.utils.data.Dataset):
    """A list of rows as a map-style dataset."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def accumulation_rows() -> list[dict]:
    """8 examples, seven with 1 labelled token and one with 8: however the Trainer shuffles them, the two
    micro-batches of 4 hold different numbers of labelled tokens (4 and 11), so a mean of micro-batch means differs
    from the mean over all tokens."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for index in range(8):
        labels = torch.randint(0, 9, (tester.seq_length,), generator=generator)
        labels[0] = -100
        if index < 7:
            labels[2:] = -100
        rows.append(
            {
                "input_ids": torch.randint(5, 60, (tester.seq_length,), generator=generator),
                "attention_mask": torch.ones(tester.seq_length, dtype=torch.long),
                "visual_features": torch.randn(tester.num_objects, tester.visual_feature_dim, generator=generator),
                "visual_mask": torch.tensor([1, 1, index % 2, 0], dtype=torch.bool),
                "labels": labels,
            }
        )
    return rows
