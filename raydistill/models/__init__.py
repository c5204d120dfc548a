"""Networks and teacher adapters: the analytic mixture, the built-in UNet, checkpoints."""

from raydistill.models.checkpoint import (
    Checkpoint,
    as_denoiser,
    build_network,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from raydistill.models.classifier import Classifier, load_classifier, save_classifier
from raydistill.models.denoiser import ModelDenoiser, make_schedule
from raydistill.models.gmm import AnalyticTeacher, GaussianMixture
from raydistill.models.unet import UNet

__all__ = [
    "AnalyticTeacher", "Checkpoint", "Classifier", "GaussianMixture", "ModelDenoiser", "UNet",
    "as_denoiser", "build_network", "fingerprint", "load_checkpoint", "load_classifier",
    "make_schedule", "save_checkpoint", "save_classifier",
]
