"""The prepared-data format, shared by its writer (prepare, output) and its readers (dataset,
verify): a folder of `{split}_{NNNNN}.bin` token shards described by one manifest."""

FORMAT = "triaxis-tokens-v1"
"""The manifest's "format": readers refuse any other."""
MANIFEST = "manifest.json"
"""The manifest's file name, written last: a folder without it is not prepared data."""
