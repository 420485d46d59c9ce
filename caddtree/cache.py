"""Where caddtree keeps what it makes once and reuses: cost models, converted GGUF targets."""

import os
import pathlib


def cache_root() -> pathlib.Path:
    """$CADDTREE_CACHE, else ~/.cache/caddtree."""
    return pathlib.Path(os.environ.get("CADDTREE_CACHE") or "~/.cache/caddtree").expanduser()
