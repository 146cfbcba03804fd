"""Every registered dataset and model (the registries are the test matrix)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from orchestrator.config import DatasetConfig, SyntheticConfig, load_config, loader_workers
from orchestrator.data import DATASETS, DataBundle, build_dataset
from orchestrator.data.datasets import CIFAR_MEAN, CIFAR_STD, cifar_augmentation
from orchestrator.data.tensors import PadCropFlip, TensorImages
from orchestrator.errors import UserError
from orchestrator.models import MODELS, CosineHead, build_model, create_model
from orchestrator.train_loop import epoch_seed, training_loader

LOCAL = {"digits_lt": (10, (1, 8, 8)), "fashion_mnist_lt": (10, (1, 28, 28)), "synthetic_manifolds": (8, (16,))}
NEEDS_FILES = ["cifar10_lt", "cifar100_lt", "imagenet_lt", "inat2018"]


def test_registry_lists_every_dataset():
    assert set(DATASETS.names()) == set(LOCAL) | set(NEEDS_FILES)


@pytest.mark.parametrize("name", sorted(LOCAL))
def test_local_datasets_are_long_tailed_with_balanced_test(name):
    bundle = build_dataset(DatasetConfig(name=name, imbalance_factor=10), seed=0)
    classes, shape = LOCAL[name]
    assert bundle.num_classes == classes and bundle.input_shape == shape
    counts = bundle.class_counts
    assert counts[0] == counts.max() and counts[0] / counts[-1] == pytest.approx(10, rel=0.1)
    test_counts = np.bincount(bundle.test.labels.numpy())
    assert len(set(test_counts.tolist())) == 1
    image, label = bundle.train[0]
    assert tuple(image.shape) == shape and int(label) in range(classes)


def test_fashion_mnist_reads_the_debian_package():
    bundle = build_dataset(DatasetConfig(name="fashion_mnist_lt", imbalance_factor=100), seed=0)
    assert bundle.class_counts[0] == 6000 and bundle.class_counts[-1] == 60
    assert len(bundle.test) == 10000


def test_synthetic_manifolds_know_their_curvature():
    config = DatasetConfig(name="synthetic_manifolds",
                           synthetic=SyntheticConfig(num_classes=4, radius_min=1, radius_max=2))
    bundle = build_dataset(config, seed=0)
    # 1/r after scaling by 1/(2 r_max)
    assert bundle.true_curvature.tolist() == pytest.approx([2.0, 2 ** (4 / 3), 2 ** (5 / 3), 4.0])


@pytest.mark.parametrize("name", NEEDS_FILES)
def test_missing_dataset_says_where_it_looked(name, tmp_path):
    with pytest.raises(UserError) as info:
        build_dataset(DatasetConfig(name=name, root=str(tmp_path), download=False), seed=0)
    assert str(tmp_path) in str(info.value)


def test_unknown_dataset_lists_choices():
    with pytest.raises(UserError, match="choose one of cifar100_lt"):
        build_dataset(DatasetConfig(name="mnist"), seed=0)


SHAPES = {"mlp": (1, 8, 8), "small_cnn": (1, 28, 28), "resnet32": (3, 32, 32), "resnet50": (3, 64, 64),
          "resnext50": (3, 64, 64)}


def test_registry_lists_every_model():
    assert set(MODELS.names()) == set(SHAPES)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_models_return_features_and_logits(name):
    torch.manual_seed(0)
    model = create_model(name, SHAPES[name], num_classes=7).eval()
    features, logits = model(torch.randn(2, *SHAPES[name]))
    assert features.shape == (2, model.feature_dim) and logits.shape == (2, 7)
    assert torch.equal(model.forward_head(model.forward_features(torch.zeros(1, *SHAPES[name]))),
                       model(torch.zeros(1, *SHAPES[name]))[1])


@pytest.mark.parametrize("overrides,head", [([], nn.Linear), (["loss.name=ldam"], CosineHead),
                                            (["loss.name=ldam", "model.head=linear"], nn.Linear),
                                            (["loss.name=ldam", "model.head=cosine"], CosineHead)])
def test_the_head_follows_the_loss_unless_named(overrides, head):
    """``model.head: auto`` gives LDAM the cosine classifier its margins are defined on (Cao et al.
    2019) and every other loss the linear one; a named head is taken as named."""
    model = build_model(load_config("digits_lt", overrides), (1, 8, 8), 10)
    assert type(model.head) is head


def test_cosine_head_gives_the_cosines_of_features_and_class_weights():
    torch.manual_seed(0)
    model = create_model("mlp", (1, 8, 8), 5, head="cosine")
    with torch.no_grad():
        features, logits = model(torch.randn(6, 1, 8, 8))
        weight = model.head.weight
        expected = (features @ weight.T) / (features.norm(dim=1, keepdim=True) * weight.norm(dim=1))
        torch.testing.assert_close(logits, expected)
        assert float(logits.abs().max()) <= 1.0 + 1e-6
        # a sample's scale changes none of its logits
        torch.testing.assert_close(model.forward_head(3.0 * features), logits)


@pytest.mark.parametrize("scaling,processes", [({"use_gpu": False, "cpus_per_worker": 4}, 0),
                                               ({"use_gpu": True, "cpus_per_worker": 4}, 3),
                                               ({"use_gpu": True, "cpus_per_worker": 1}, 0),
                                               ({"use_gpu": False, "loader_workers": 2}, 2)])
def test_loader_processes_follow_the_workers_cpus(scaling, processes):
    """"auto": a GPU worker's CPUs but one read ahead; a CPU worker's CPUs compute."""
    overrides = [f"scaling.{key}={str(value).lower()}" for key, value in scaling.items()]
    assert loader_workers(load_config("digits_lt", overrides).scaling) == processes


def test_a_resumed_epoch_draws_the_same_augmented_batches_with_loader_processes():
    """The train loop seeds each epoch (``epoch_seed``) before it iterates; with two loader
    processes, an epoch's batches (order and random crops) must then be the same whether the run got
    there from epoch 0 or was resumed at that epoch, as they are with none."""
    images = torch.arange(48 * 3 * 8 * 8, dtype=torch.float32).reshape(48, 3, 8, 8)
    labels = torch.arange(48) % 4
    data = DataBundle(train=TensorImages(images, labels, PadCropFlip(2)), train_plain=TensorImages(images, labels),
                      test=TensorImages(images, labels), train_labels=labels.numpy(), num_classes=4,
                      input_shape=(3, 8, 8))
    config = load_config("digits_lt", ["train.batch_size=16", "scaling.loader_workers=2"])

    def epochs(first: int, last: int) -> list[list[torch.Tensor]]:
        loader, sampler = training_loader(data, config, world_size=1, rank=0)
        assert loader.num_workers == 2
        seen = []
        for epoch in range(first, last + 1):
            sampler.set_epoch(epoch)
            torch.manual_seed(epoch_seed(config.seed, epoch, 0))
            seen.append([batch for batch, _ in loader])
        return seen

    uninterrupted, resumed = epochs(0, 1), epochs(1, 1)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[1], resumed[0]))
    assert not all(torch.equal(a, b) for a, b in zip(uninterrupted[0], uninterrupted[1]))
    loader, sampler = training_loader(data, config, world_size=1, rank=0)
    sampler.set_epoch(1)
    torch.manual_seed(12345)  # the same images in the same order, other crops
    assert not all(torch.equal(a, b) for a, b in zip(resumed[0], [batch for batch, _ in loader]))


def test_cifar_crops_pad_with_the_fill_of_each_channel():
    """Padding is black in the raw image (torchvision's ``RandomCrop(32, padding=4)`` before
    ``Normalize``): after normalisation a different value per channel, not 0."""
    fill = torch.tensor([-1.0, -2.0, -3.0])
    augment = PadCropFlip(padding=2, fill=fill)
    torch.manual_seed(0)
    crops = torch.stack([augment(torch.ones(3, 4, 4)) for _ in range(200)])
    assert crops.shape == (200, 3, 4, 4)
    for channel in range(3):
        values = set(crops[:, channel].unique().tolist())
        assert values == {1.0, fill[channel].item()}, values  # each crop: image, and the channel's fill
    assert (crops == 1).all(dim=(1, 2, 3)).any()  # some crops fall on the image alone
    assert set(PadCropFlip(padding=2)(torch.ones(3, 4, 4)).unique().tolist()) <= {0.0, 1.0}
    torch.manual_seed(3)  # CIFAR's padding, un-normalised, is black
    padding = [crop[~crop.isnan()].reshape(3, -1) for crop in (cifar_augmentation()(torch.full((3, 32, 32), torch.nan))
                                                                for _ in range(20))]
    raw = torch.cat(padding, dim=1) * CIFAR_STD[:, None] + CIFAR_MEAN[:, None]
    assert raw.shape[1] > 0 and raw.abs().max() < 1e-6


def test_a_crop_is_the_window_of_the_padded_image():
    """The crop is cut without padding the image first: the same pixels as the padded image's
    window at every offset, flipped or not; and the augmentation pickles, as DataLoader processes
    started by spawn need."""
    fill, image = torch.tensor([-1.0, -2.0, -3.0]), torch.randn(3, 6, 5)
    augment = pickle.loads(pickle.dumps(PadCropFlip(padding=2, fill=fill)))
    padded = fill[:, None, None].repeat(1, 10, 9)
    padded[:, 2:8, 2:7] = image
    windows = set()
    for seed in range(200):
        torch.manual_seed(seed)
        top, left = torch.randint(0, 5, (2,)).tolist()
        flipped = bool(torch.rand(()) < 0.5)
        window = padded[:, top : top + 6, left : left + 5]
        torch.manual_seed(seed)
        assert torch.equal(augment(image), window.flip(-1) if flipped else window), (top, left, flipped)
        windows.add((top, left, flipped))
    assert len(windows) == 50  # every offset, flipped and not
