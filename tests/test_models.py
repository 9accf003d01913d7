"""Model shapes and parameter counts."""
import pytest
import torch
import torch.nn as nn

import models


def test_basenet_is_exactly_the_course_baseline():
    net = models.BaseNet()
    layers = [m for m in net.modules() if not isinstance(m, (nn.Sequential, models.BaseNet))]
    kinds = [type(m).__name__ for m in layers]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear", "ReLU", "Linear"]
    conv1, conv2, fc1, fc2 = (m for m in layers if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size) == (3, 6, (5, 5))
    assert (conv2.in_channels, conv2.out_channels, conv2.kernel_size) == (6, 16, (5, 5))
    assert (fc1.in_features, fc1.out_features, fc2.in_features, fc2.out_features) == (400, 50, 50, 100)
    assert models.count_parameters(net) == 456 + 2416 + 20050 + 5100 == 28022
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert net.features(torch.zeros(1, 3, 32, 32)).shape == (1, 400)


@pytest.mark.parametrize("depth", [1, 3, 8, 13])
@pytest.mark.parametrize("norm", ["bn", "gn", "none"])
def test_convnet_has_the_asked_depth_and_norm(depth, norm):
    net = models.ConvNet(depth=depth, width=8, norm=norm)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth
    norms = {"bn": nn.BatchNorm2d, "gn": nn.GroupNorm, "none": type(None)}[norm]
    assert sum(isinstance(m, norms) for m in net.modules()) == (depth if norm != "none" else 0)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_residual_pairs_keep_depth():
    plain = models.ConvNet(depth=8, width=8, norm="bn")
    residual = models.ConvNet(depth=8, width=8, norm="bn", residual=True)
    # stages of 3, 3, 2 convs: after each stage's first (channel-changing) conv, 2, 2, 1 remain: two pairs
    assert sum(isinstance(m, models.ResidualPair) for m in residual.modules()) == 2
    assert models.count_parameters(plain) == models.count_parameters(residual)


def test_cifar_resnet18_shape():
    net = models.CifarResNet18()
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert 11_000_000 < models.count_parameters(net) < 11_300_000


def test_frozen_transfer_net_keeps_backbone_in_eval_mode():
    net = models.TransferNet("resnet18", 7, dropout=0.5, freeze_backbone=True)
    net.train()
    assert net.training and net.head.training and not net.backbone.training
    assert models.count_parameters(net, trainable_only=True) == 512 * 7 + 7
    feats = torch.randn(3, 512)
    assert net(feats).shape == (3, 7)  # precomputed features skip the backbone


def test_timm_model_normalisation_follows_its_config():
    net = models.TransferNet("tf_efficientnet_lite0", 5)
    assert net.mean == (0.5, 0.5, 0.5) and net.std == (0.5, 0.5, 0.5) and net.num_features == 1280
    tv = models.TransferNet("resnet18", 5)
    assert tv.mean == models.IMAGENET_MEAN


def test_unknown_arch_is_a_value_error():
    with pytest.raises(ValueError, match="unknown --arch 'resnet7'"):
        models.TransferNet("resnet7", 5)


def test_architecture_table_lists_every_layer():
    table = models.architecture_table(models.BaseNet())
    assert "| features.0 | Conv2d | 6x28x28 | 456 |" in table
    assert "| features.6 | Flatten | 400 | 0 |" in table
    assert "**28,022**" in table
