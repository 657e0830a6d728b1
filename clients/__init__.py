"""The ClientApp side: one Flower client per shard (SISA training, unlearning)."""
