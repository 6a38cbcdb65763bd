"""chatforge: train your own ChatGPT-style assistant from scratch on the Hugging Face stack."""

__version__ = "0.1.0"
