"""The prepared-data format, shared by its writer (prepare, output) and its readers (dataset,
verify): a folder of `{split}_{NNNNN}.bin` token shards described by one manifest. A split packed by
`prepare --pack-seq-len` (packing.py) holds whole windows of seq_len + 1 tokens."""

from triaxis.errors import UserError

FORMAT = "triaxis-tokens-v1"
"""The manifest's "format": readers refuse any other."""
MANIFEST = "manifest.json"
"""The manifest's file name, written last: a folder without it is not prepared data."""
MASK_SUFFIX = ".mask"
"""A shard's loss mask (`train_00000.mask` beside `train_00000.bin`), when the manifest has a
"loss_mask" entry: one byte per token, 1 where the token is a target the loss counts."""
MASK_DTYPE = "uint8"
SPLITS = ("train", "val")
"""The splits a prepared folder holds, in the manifest's order (a split may hold no tokens)."""


def packed_seq_len(manifest: dict) -> int:
    """The data.seq_len a split was packed for (0 = not packed)."""
    return int(manifest.get("packing", {}).get("seq_len", 0))


def check_seq_len(manifest: dict, seq_len: int, path: str) -> None:
    packed = packed_seq_len(manifest)
    if packed and packed != seq_len:
        raise UserError(
            f"data.seq_len={seq_len} but {path} was packed for seq_len {packed} (whole "
            f"examples per window); set --data.seq_len={packed} or prepare again with "
            f"--pack-seq-len {seq_len}"
        )
