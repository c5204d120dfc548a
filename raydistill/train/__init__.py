"""Student training on Ray Train workers, each trainable module in its own DeepSpeed engine."""
