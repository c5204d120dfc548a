"""Train the domain classifier that recognises samples (and gives FID features on small images)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from raydistill.config import ClassifierJob
from raydistill.data import load_images
from raydistill.devices import resolve_device
from raydistill.models.classifier import Classifier, save_classifier


@dataclass
class ClassifierResult:
    test_accuracy: float
    train_accuracy: float


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to max_shift pixels (background -1 fills in): robustness to the
    small misalignments generated samples have."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).tolist()
              for _ in range(2))
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train_classifier(job: ClassifierJob, out: str, *, progress: bool = True) -> ClassifierResult:
    torch.manual_seed(job.seed)
    device = resolve_device(job.device)
    split = load_images(job.data).to(device)
    model = Classifier(split.train.images.shape[1], split.num_classes, job.width).to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=job.lr, total_steps=job.steps)
    g = torch.Generator().manual_seed(job.seed)
    train = split.train
    max_shift = max(1, job.data.resolution // 16)
    for _ in tqdm(range(job.steps), desc="classifier", disable=not progress, mininterval=1.0):
        idx = torch.randint(0, len(train), (job.batch_size,), generator=g).to(device)
        x = random_shift(train.images[idx], max_shift, g)
        loss = F.cross_entropy(model(x), train.labels[idx])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
    model.eval()
    result = ClassifierResult(model.accuracy(split.test.images, split.test.labels),
                              model.accuracy(train.images, train.labels))
    save_classifier(out, model.cpu(), {"test_accuracy": result.test_accuracy,
                                 "train_accuracy": result.train_accuracy,
                                 "data": job.data.source, "resolution": job.data.resolution,
                                 "num_classes": split.num_classes})
    return result
