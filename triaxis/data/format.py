"""The prepared-data format, shared by its writer (prepare, output) and its readers (dataset,
verify): a folder of `{split}_{NNNNN}.bin` token shards described by one manifest."""

FORMAT = "triaxis-tokens-v1"
"""The manifest's "format": readers refuse any other."""
MANIFEST = "manifest.json"
"""The manifest's file name, written last: a folder without it is not prepared data."""
MASK_SUFFIX = ".mask"
"""A shard's loss mask (`train_00000.mask` beside `train_00000.bin`), when the manifest has a
"loss_mask" entry: one byte per token, 1 where the token is a target the loss counts."""
MASK_DTYPE = "uint8"
