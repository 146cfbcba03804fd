"""ImageNet-LT and iNaturalist 2018: image folders plus the published split lists (SPEC §5).

Both are long-tailed as published, so ``dataset.imbalance_factor`` does not apply. ``dataset.root``
must hold the images and the list files (lines ``relative/path.jpg label``) from Liu et al.
(OLTR, CVPR 2019) and Kang et al. (Decoupling, ICLR 2020).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from orchestrator.config import DatasetConfig
from orchestrator.data.datasets import DATASETS, DataBundle
from orchestrator.errors import UserError

SPLITS = {
    "imagenet_lt": ("ImageNet_LT_train.txt", "ImageNet_LT_test.txt", 1000),
    "inat2018": ("iNaturalist18_train.txt", "iNaturalist18_val.txt", 8142),
}


class ImageList(Dataset):
    """Images listed as ``path label`` lines, loaded with PIL and a torchvision transform."""

    def __init__(self, root: Path, entries: list[tuple[str, int]], transform):
        self.root, self.entries, self.transform = root, entries, transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.entries[index]
        with Image.open(self.root / path) as image:
            return self.transform(image.convert("RGB")), label


def read_split(path: Path) -> list[tuple[str, int]]:
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise UserError(f"{path}:{number}: expected 'relative/path label', got {line!r}")
            entries.append((parts[0], int(parts[1])))
    return entries


def _image_list_bundle(config: DatasetConfig, name: str) -> DataBundle:
    from torchvision import transforms

    train_file, test_file, num_classes = SPLITS[name]
    root = Path(config.root).expanduser()
    missing = [f for f in (train_file, test_file) if not (root / f).is_file()]
    if missing:
        raise UserError(f"dataset {name}: {', '.join(missing)} not found in {root}; put the images and the "
                        f"published split lists there (see README, 'Datasets') and set dataset.root")
    normalize = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train_tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    test_tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalize])
    train_entries, test_entries = read_split(root / train_file), read_split(root / test_file)
    labels = np.array([label for _, label in train_entries], dtype=np.int64)
    return DataBundle(train=ImageList(root, train_entries, train_tf),
                      train_plain=ImageList(root, train_entries, test_tf),
                      test=ImageList(root, test_entries, test_tf), train_labels=labels, num_classes=num_classes,
                      input_shape=(3, 224, 224))


@DATASETS.register("imagenet_lt")
def imagenet_lt(config: DatasetConfig, seed: int) -> DataBundle:
    return _image_list_bundle(config, "imagenet_lt")


@DATASETS.register("inat2018")
def inat2018(config: DatasetConfig, seed: int) -> DataBundle:
    return _image_list_bundle(config, "inat2018")
