"""Real-data sources: images in [-1, 1] with class labels, split into train and held-out parts."""

from raydistill.data.digits import LabelledImages, Split, load_digits
from raydistill.data.sources import load_images

__all__ = ["LabelledImages", "Split", "load_digits", "load_images"]
