"""Graph passes: each a small class whose call returns PassResult(model, modified)."""
