"""Text in: sources of every format, the tokenizer, and conversations for chat fine-tuning."""
