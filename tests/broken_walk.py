"""A deliberately broken acceptance walk, to show that the exactness checks have power."""

import torch


def take_the_first_child_always(monkeypatch) -> None:
    """The engine's walk, but the root's choice is replaced by its first child's token: that child
    is always accepted, whatever the target chose."""
    from caddtree.decode import engine

    real_walk = engine.accepted_path

    def walk(tree, choices, max_length):
        return real_walk(tree, torch.cat([tree.tokens[:1], choices[1:]]) if tree.size else choices, max_length)

    monkeypatch.setattr(engine, "accepted_path", walk)
