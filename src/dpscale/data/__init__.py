"""The data stage: sources -> prepared uint8 arrays (prepare) -> train/holdout/test indices (split).

- `sources`: index a dataset (class names + one item per image) without decoding anything.
- `images`: decode one item and resize it to a square (pure functions, Pillow).
- `fetch`: download a pinned archive and extract it safely (source `url`).
- `prepare`: decode the chosen items in parallel into images.npy / labels.npy / manifest.json.
- `split`: balanced or long-tailed train sets, a holdout set and a balanced test set.
"""


class DataError(ValueError):
    """Bad input for the data stage; the message is one line naming what is wrong."""
