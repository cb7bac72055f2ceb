"""Training data: source trees → starcoderdata-layout parquet → tokenizer → packed token shards.

- `sources`: `stablecode data from-dir`, a local tree of files to the starcoderdata layout.
- `starcoder`: streaming reader of that layout, the language mix, the train/validation split by file.
- `tokenizer_train`: `stablecode tokenizer train`, a StarCoder-style byte-level BPE.
- `packing`: `stablecode data pack` and `PackedTokens`, the memory-mapped shards the training loop reads.
"""

from stablecode.errors import StablecodeError


class DataError(StablecodeError):
    """Data that cannot be used as it is: an unreadable parquet file, an empty corpus, a bad pack directory."""
