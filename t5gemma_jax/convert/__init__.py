"""Checkpoint conversion: Hugging Face T5Gemma folders (hf.py)."""
