"""caddtree: lossless speculative decoding with cost-aware diffusion draft trees."""

from caddtree.errors import CaddtreeError

__all__ = ["CaddtreeError", "load"]


def load(*args, **kwargs):
    """Load a target/drafter pair; see caddtree.api.load (imported lazily: torch is slow to import)."""
    from caddtree.api import load as load_pair

    return load_pair(*args, **kwargs)
