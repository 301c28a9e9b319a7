"""Checkpoint conversion: Hugging Face T5Gemma folders (hf.py), each layer importing only below:
param_schema / config modules -> hf_reader, hf_writer -> hf -> adapt, adapt_gemma3, hf_checkpoint."""
