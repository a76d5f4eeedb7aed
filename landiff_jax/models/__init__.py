"""One file per model; each is a Flax linen module built from its config section."""
