"""Frozen Flax T5 and GPT-2, and Hugging Face checkpoint loading."""
