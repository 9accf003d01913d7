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


@pytest.mark.parametrize("depth,widen,params", [(28, 10, 36_536_884), (16, 8, 11_007_540)])
def test_wide_resnets_match_the_paper(depth, widen, params):
    """WRN-28-10 has 36.5M parameters and WRN-16-8 11.0M (Zagoruyko & Komodakis 2016, table 1 / 36.5M)."""
    net = models.build_cifar_model("wrn", depth=depth, widen=widen)
    assert models.count_parameters(net) == params
    assert round(models.count_parameters(net) / 1e6, 1) == {28: 36.5, 16: 11.0}[depth]
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == depth - 3  # stem + 2 per block; the classifier is the depth's last layer, shortcuts 1x1
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_preact_resnet18_shape_and_size():
    net = models.build_cifar_model("preact18")
    blocks = [m for m in net.modules() if isinstance(m, models.PreActBlock)]
    assert len(blocks) == 8 and models.count_parameters(net) == 11_218_340  # 11.2M, as ResNet-18 on CIFAR
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    table = models.architecture_table(net)
    assert "PreActBlock" not in table and "| **total** | | | **11,218,340**" in table


def test_init_auto_is_he_only_where_no_normalisation_follows():
    r = models.resolve_init
    assert r("auto", "convnet", "none") == "kaiming"  # a plain stack needs He to learn at all
    assert r("auto", "convnet", "bn") == r("auto", "convnet", "gn") == "default"  # scale-invariant convs
    assert r("auto", "basenet") == "default" and r("auto", "wrn", "bn") == r("auto", "preact18") == "kaiming"
    assert r("kaiming", "convnet", "bn") == "kaiming" and r("default", "convnet", "none") == "default"  # asked for
    torch.manual_seed(0)
    bn_auto = models.build_cifar_model("convnet", depth=3, width=16, norm="bn")
    torch.manual_seed(0)
    bn_default = models.build_cifar_model("convnet", depth=3, width=16, norm="bn", init="default")
    assert all(torch.equal(a, b) for a, b in zip(bn_auto.state_dict().values(), bn_default.state_dict().values(), strict=True))
    import train_cifar

    def resolved(argv):
        args = train_cifar.parse_args(argv)
        train_cifar.resolve(args, argv)
        return args
    assert resolved(["--bn"]).init == "default" and resolved(["--depth", "8"]).init == "kaiming"
    assert resolved(["--preset", "final"]).init == "kaiming"


def test_kaiming_init_is_the_plain_convnet_default_and_default_is_kept_on_request():
    torch.manual_seed(0)
    he = models.build_cifar_model("convnet", depth=3, width=16, norm="none")
    torch.manual_seed(0)
    plain = models.build_cifar_model("convnet", depth=3, width=16, norm="none", init="default")
    w_he, w_plain = he.features[2][0].weight, plain.features[2][0].weight  # the 16 -> 32 3x3 conv
    fan_out = 32 * 9
    assert abs(w_he.std().item() - (2 / fan_out) ** 0.5) < 0.01  # He: std sqrt(2 / fan_out)
    assert w_plain.std().item() < 0.6 * w_he.std().item()  # PyTorch's default is much smaller
    assert models.count_parameters(models.BaseNet()) == models.count_parameters(models.build_cifar_model("basenet"))


def test_mixing_keeps_label_mass_and_cutmix_stays_in_its_box():
    import data
    torch.manual_seed(0)
    x = torch.rand(16, 3, 32, 32)
    y = torch.randint(0, 10, (16,))
    mixed, target = data.mix_batch(x, y, 10, seed=3, cutmix=1.0, prob=1.0, smoothing=0.1)
    assert torch.allclose(target.sum(1), torch.ones(16)) and (target >= 0).all()
    partner = x.flip(0)
    for i in range(16):
        from_partner = (mixed[i] == partner[i]) & (mixed[i] != x[i])
        changed = mixed[i] != x[i]
        assert torch.equal(changed, from_partner)  # pixels only ever come from the partner
        rows, cols = changed.any(0).any(1).nonzero(), changed.any(0).any(0).nonzero()
        if len(rows):  # changed pixels fill exactly one rectangle
            box = changed.any(0)[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert box.all() and changed.any(0).sum() == box.numel()
            kept = 1 - box.numel() / (32 * 32)  # lam is the kept area
            expected = 0.9 * (kept * torch.nn.functional.one_hot(y[i], 10) + (1 - kept) *
                              torch.nn.functional.one_hot(y.flip(0)[i], 10)) + 0.01
            assert torch.allclose(target[i], expected, atol=1e-5)
    mixed_up, target_up = data.mix_batch(x, y, 10, seed=3, mixup=0.4, prob=1.0)
    lam = target_up[torch.arange(16), y]
    same = y == y.flip(0)
    lam = torch.where(same, torch.ones(16), lam)
    for i in range(16):  # mixup: x = lam x_i + (1 - lam) x_j, with lam read back from the targets
        if not same[i]:
            assert torch.allclose(mixed_up[i], lam[i] * x[i] + (1 - lam[i]) * partner[i], atol=1e-5)
    assert torch.allclose(target_up.sum(1), torch.ones(16))


def test_ema_follows_its_formula_on_a_tiny_model():
    import engine
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = engine.make_ema(net, 0.9)
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(5):
        loss = net(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(net)
        for k, v in net.state_dict().items():
            expected[k] = 0.9 * expected[k] + 0.1 * v if v.is_floating_point() else v.clone()
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, expected[k])
    assert not torch.equal(ema.module[0].weight, net[0].weight)  # the average lags the weights
    assert engine.make_ema(net, 0.0) is None  # --ema 0: off


def test_ema_warmup_ramps_the_decay_from_a_copy():
    """--ema-warmup (the default): decay at optimizer step t is min(DECAY, 1 - t^-0.75), so step 1 copies the
    weights and the random initial ones leave the average at once."""
    import engine
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = engine.make_ema(net, 0.9, warmup=True)
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for t in range(1, 8):
        loss = net(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(net, step=t)
        d = min(0.9, 1 - t ** -0.75)
        for k, v in net.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
        if t == 1:
            torch.testing.assert_close(ema.module[0].weight, net[0].weight)  # a copy, not 10% of it
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, expected[k])


@pytest.mark.parametrize("make, shape", [(lambda: models.build_cifar_model("resnet18"), (1, 3, 32, 32)),
                                         (lambda: models.TransferNet("resnet18", 10), (1, 3, 64, 64))])
def test_stage_table_of_resnet18_has_stem_four_stages_and_head(make, shape):
    model = make()
    rows = models.stage_rows(model, shape)
    assert [r[0] for r in rows] == ["stem", "stage 1", "stage 2", "stage 3", "stage 4", "head"]
    assert sum(r[3] for r in rows) == models.count_parameters(model)
    assert [r[2][1] for r in rows[1:5]] == [64, 128, 256, 512]  # channels double stage by stage
    assert rows[-1][2] == (1, 100 if shape[-1] == 32 else 10)
    table = models.stage_table(model, shape)
    assert f"**{models.count_parameters(model):,}**" in table


@pytest.mark.parametrize("config, size, reader", [  # reader: the layer a reader of the model's code would hook
    (dict(kind="cifar", name="basenet", num_classes=10), 32, "features.5"),  # conv2-ReLU-pool, the last stage
    (dict(kind="cifar", name="convnet", num_classes=10, depth=4, width=8, norm="bn", residual=True), 32, "features"),
    (dict(kind="cifar", name="resnet18", num_classes=10, width=8), 32, "features"),  # its last stage, after the ReLU
    (dict(kind="cifar", name="preact18", num_classes=10, width=8), 32, "pool.1"),  # the ReLU after the final BN
    (dict(kind="cifar", name="wrn", num_classes=10, depth=10, widen=1), 32, "pool.1"),
    (dict(kind="transfer", arch="resnet18", num_classes=5, freeze_backbone=True), 64, "backbone.layer4"),
    (dict(kind="transfer", arch="tf_efficientnet_lite0", num_classes=5), 64, "backbone.bn2")])  # BN + ReLU6
def test_grad_cam_matches_captum_on_the_layer_a_reader_picks_in_every_family(config, size, reader):
    """Grad-CAM (captum's LayerGradCam) on the last convolutional stage of each family, after its activation: one map
    per image at the input's size, in [0, 1], not constant, different for two images, and the map captum gives on the
    layer a reader would pick (for PreAct and WRN the in-place ReLU after the last BatchNorm, not the BatchNorm)."""
    import explain
    from captum.attr import LayerAttribution, LayerGradCam
    torch.manual_seed(0)
    model = models.build_model(config)
    name, layer = explain.last_conv_stage(model, (1, 3, size, size))
    x = torch.randn(2, 3, size, size)
    targets = model.eval()(x).argmax(1)  # the top class, as predict.py explains
    cams = explain.grad_cam(model, layer, x, targets)
    assert cams.shape == (2, size, size) and cams.min() >= 0 and cams.max() <= 1
    assert all(c.std() > 0.01 for c in cams) and not torch.allclose(cams[0], cams[1]), name
    assert name == reader
    attr = LayerGradCam(model, dict(model.named_modules())[reader]).attribute(x, target=targets.tolist(),
                                                                              relu_attributions=True)
    ref = LayerAttribution.interpolate(attr.detach(), (size, size), "bilinear")[:, 0].clamp(min=0)
    torch.testing.assert_close(cams, ref / ref.flatten(1).amax(1).view(-1, 1, 1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_grad_cam_refuses_a_transformer_in_one_sentence_naming_its_family(arch):
    import explain
    model = models.build_model(dict(kind="transfer", arch=arch, num_classes=5))
    family = type(model.backbone).__name__  # VisionTransformer (ViT, DeiT), SwinTransformer
    with pytest.raises(explain.NotConvolutional, match=f"{family} is a transformer"):
        explain.last_conv_stage(model, (1, 3, 224, 224))


def test_grad_cam_runs_in_chunks_whatever_the_batch(monkeypatch):
    """Each backward pass holds at most explain.CHUNK images, and the maps are those of one pass over the batch."""
    import explain
    torch.manual_seed(0)
    model = models.build_model(dict(kind="cifar", name="wrn", num_classes=10, depth=10, widen=1))
    _, layer = explain.last_conv_stage(model, (1, 3, 32, 32))
    x = torch.randn(7, 3, 32, 32)
    targets = model.eval()(x).argmax(1)
    whole = explain.grad_cam(model, layer, x, targets)
    sizes = []
    layer.register_forward_hook(lambda m, i, out: sizes.append(len(out)))
    monkeypatch.setattr(explain, "CHUNK", 3)
    torch.testing.assert_close(explain.grad_cam(model, layer, x, targets), whole, atol=1e-5, rtol=1e-4)
    assert max(sizes) == 3 and sum(sizes) == 7
    assert all(p.requires_grad for p in model.parameters())  # the weights need their gradients again after it
