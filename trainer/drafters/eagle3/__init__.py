"""The EAGLE-3 family: its model, training step, decoding and export."""
