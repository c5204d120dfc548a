"""Real-data sources (images in [-1, 1] with class labels)."""

from raydistill.data.digits import LabelledImages, Split, load_digits

__all__ = ["LabelledImages", "Split", "load_digits"]
