"""Hugging Face Llama weights in and out: `triaxis import-hf` and `triaxis export-hf`.

convert.py   -- the name map, the RoPE row permutation, config.json <-> ModelArgs
importer.py  -- an HF folder (safetensors, single or sharded) -> a triaxis checkpoint
exporter.py  -- a triaxis checkpoint (any layout) -> an HF folder
cli.py       -- the two subcommands
"""
