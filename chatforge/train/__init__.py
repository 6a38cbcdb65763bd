"""Training stages on the transformers Trainer: `pretrain` and `sft`, and what they share (`common`)."""
