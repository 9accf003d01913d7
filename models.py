"""Models only: the course's BaseNet, a configurable CNN for the CIFAR ablations, a CIFAR
ResNet-18, the transfer-learning network for birds, and architecture tables for any model (stage-level:
stem, each stage, head; and every leaf layer).

    python models.py basenet          # prints BaseNet's stage and layer tables
    python models.py convnet --depth 8 --bn
"""
import argparse
import contextlib

import torch
import torch.nn as nn


class BaseNet(nn.Module):
    """The course baseline, exactly: two 5x5 convs with max-pooling, then 400 -> 50 -> classes."""

    def __init__(self, num_classes=100, dropout=0.0):
        super().__init__()
        self.features = nn.Sequential(  # in-place ReLUs: the same maths, one allocation less per layer
            nn.Conv2d(3, 6, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten())
        head = [nn.Linear(400, 50), nn.ReLU(inplace=True), nn.Linear(50, num_classes)]
        if dropout > 0:
            head = [nn.Dropout(dropout), head[0], head[1], nn.Dropout(dropout), head[2]]
        self.classifier = nn.Sequential(*head)

    def forward(self, x):
        return self.classifier(self.features(x))


def norm_layer(kind, channels):
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


class GlobalAvgPool(nn.Module):
    """Mean over height and width, (N, C, H, W) -> (N, C). The same as AdaptiveAvgPool2d(1) + Flatten, but its
    CUDA backward is deterministic (AdaptiveAvgPool2d's is not), so --deterministic runs on a GPU too."""

    def forward(self, x):
        return x.mean((2, 3))


class ConvBlock(nn.Sequential):
    def __init__(self, c_in, c_out, norm):
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none"), norm_layer(norm, c_out),
                         nn.ReLU(inplace=True))


class ResidualPair(nn.Module):
    """Two 3x3 conv blocks with an identity shortcut around them."""

    def __init__(self, channels, norm):
        super().__init__()
        self.body = nn.Sequential(ConvBlock(channels, channels, norm), ConvBlock(channels, channels, norm))

    def forward(self, x):
        return x + self.body(x)


class ConvNet(nn.Module):
    """`depth` 3x3 conv layers in three stages (width, 2*width, 4*width channels, max-pool between),
    optional BatchNorm/GroupNorm and residual pairs, global average pooling, dropout, linear head."""

    def __init__(self, depth=8, width=32, norm="bn", dropout=0.0, residual=False, num_classes=100):
        super().__init__()
        if depth < 1:
            raise ValueError("depth must be at least 1")
        per_stage = [depth // 3 + (i < depth % 3) for i in range(3)]
        layers, c_in = [], 3
        for stage, n_convs in enumerate(per_stage):
            if n_convs == 0:
                continue
            c_out = width * 2 ** stage
            layers.append(ConvBlock(c_in, c_out, norm))
            remaining = n_convs - 1
            while remaining >= 2 and residual:
                layers.append(ResidualPair(c_out, norm))
                remaining -= 2
            layers += [ConvBlock(c_out, c_out, norm) for _ in range(remaining)]
            if stage < 2 and per_stage[stage + 1] > 0:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = GlobalAvgPool()
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(c_in, num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stem without max-pool, four stages of two basic blocks."""

    def __init__(self, num_classes=100, width=64, dropout=0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        blocks, c_in = [], width
        for stage in range(4):
            c_out = width * 2 ** stage
            blocks += [BasicBlock(c_in, c_out, 1 if stage == 0 else 2), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.pool = GlobalAvgPool()
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(c_in, num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(self.stem(x))))


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, "Identity Mappings"): BN-ReLU-conv twice, identity shortcut
    (a 1x1 conv on the pre-activated input where the shape changes), optional dropout between the convs (WRN)."""

    def __init__(self, c_in, c_out, stride, dropout=0.0):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.drop(torch.relu(self.bn2(out))))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet on 32x32 inputs: 3x3 stem, stages of PreActBlocks, BN-ReLU, average pool, linear.

    PreAct ResNet-18: blocks (2, 2, 2, 2), widths 64..512. Wide ResNet WRN-d-k (Zagoruyko & Komodakis 2016): three
    stages of (d - 4) / 6 blocks, widths 16k, 32k, 64k, a 16-channel stem, dropout inside the blocks."""

    def __init__(self, blocks, widths, stem=64, num_classes=100, dropout=0.0, block_dropout=0.0):
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        layers, c_in = [], stem
        for i, (n, c_out) in enumerate(zip(blocks, widths, strict=True)):
            for j in range(n):
                layers.append(PreActBlock(c_in, c_out, 2 if (j == 0 and i > 0) else 1, block_dropout))
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU(inplace=True), GlobalAvgPool())
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(c_in, num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(self.stem(x))))


def wide_resnet(depth=28, widen=10, num_classes=100, dropout=0.0):
    if (depth - 4) % 6:
        raise ValueError(f"a Wide ResNet's depth is 6n + 4 (16, 22, 28, 40, ...), got {depth}")
    n = (depth - 4) // 6
    return PreActResNet((n, n, n), (16 * widen, 32 * widen, 64 * widen), stem=16, num_classes=num_classes,
                        block_dropout=dropout)


def init_weights(model):
    """He/Kaiming initialisation (fan-out, ReLU gain) for convolutions, as torchvision does for its ResNets;
    norm layers at weight 1 and bias 0; linear layers keep PyTorch's default. Without it a plain 8-conv stack
    (no normalisation) starts with vanishing activations and never learns (BENCHMARKS.md)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


CIFAR_MODELS = ("basenet", "convnet", "resnet18", "preact18", "wrn")
INITS = ("auto", "kaiming", "default")


def resolve_init(init, name, norm="none"):
    """The conv initialisation a network gets: `init` unless 'auto', which picks per family from the proxy
    measurements in BENCHMARKS.md ("Initialisation per network family"):
    - convnet without normalisation: He. A plain 8-conv stack with PyTorch's default init never learns.
    - convnet with BatchNorm/GroupNorm: PyTorch's default. A norm layer after every conv makes the conv
      scale-invariant, so its effective learning rate goes as lr / |w|^2. He's fan-out normal draws a 3x3 conv's
      weights sqrt(6) = 2.4x larger than PyTorch's default, so training starts with a 6x smaller effective
      learning rate, which a short schedule never makes up: He measured worse on the BatchNorm rows and on cpu5.
    - resnet18, preact18, wrn: He, as torchvision and the WRN paper do (their long schedules are what the
      final preset runs; not measured here).
    - basenet: PyTorch's default, the course recipe."""
    if init != "auto":
        return init
    if name == "basenet":
        return "default"
    if name == "convnet":
        return "kaiming" if norm == "none" else "default"
    return "kaiming"


def build_cifar_model(name, num_classes=100, depth=8, width=32, norm="none", dropout=0.0, residual=False,
                      init="auto", widen=None):
    """A CIFAR network by name. `init`: 'auto' (per family, `resolve_init`), 'kaiming' or 'default'; BaseNet
    always keeps PyTorch's default (the course recipe). For 'wrn', `depth` and `widen` give WRN-depth-widen."""
    if name == "basenet":
        return BaseNet(num_classes, dropout)
    if name == "convnet":
        model = ConvNet(depth, width, norm, dropout, residual, num_classes)
    elif name == "resnet18":
        model = CifarResNet18(num_classes, width=64 if width == 32 else width, dropout=dropout)
    elif name == "preact18":
        w = 64 if width == 32 else width
        model = PreActResNet((2, 2, 2, 2), (w, 2 * w, 4 * w, 8 * w), stem=w, num_classes=num_classes, dropout=dropout)
    elif name == "wrn":
        model = wide_resnet(depth, widen or 10, num_classes, dropout)
    else:
        raise ValueError(f"unknown CIFAR model {name!r}")
    return init_weights(model) if resolve_init(init, name, norm) == "kaiming" else model


# ----------------------------------------------------------------------------- transfer learning

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.fc.", "head.", "last_linear.")


class WeightsMismatch(ValueError):
    pass


def make_backbone(arch, pretrained_imagenet=False):
    """Backbone returning pooled features, its feature width and its input mean/std."""
    if arch in TORCHVISION_RESNETS:
        import torchvision
        weights = "DEFAULT" if pretrained_imagenet else None
        net = getattr(torchvision.models, arch)(weights=weights)
        width = net.fc.in_features
        net.fc = nn.Identity()
        net.avgpool = GlobalAvgPool()  # same output after torchvision's flatten; deterministic on CUDA
        return net, width, IMAGENET_MEAN, IMAGENET_STD
    import timm
    name = arch.removeprefix("timm:")
    if not timm.is_model(name):
        raise ValueError(f"unknown --arch {arch!r}: not a torchvision ResNet ({', '.join(TORCHVISION_RESNETS)}) "
                         f"nor a timm model name")
    net = timm.create_model(name, pretrained=pretrained_imagenet, num_classes=0)
    cfg = net.pretrained_cfg or {}
    return net, net.num_features, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def load_backbone_weights(backbone, path):
    """Load an ImageNet state dict from a local file into the backbone (classifier keys ignored)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain types
        raise WeightsMismatch(f"{path} cannot be loaded safely as a state dict ({type(e).__name__}); "
                              f"only plain tensors are accepted") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsMismatch(f"{path} does not hold a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = backbone.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(CLASSIFIER_PREFIXES)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise WeightsMismatch(f"{path} does not fit this architecture: {'; '.join(parts)}")
    backbone.load_state_dict(state)


# torchvision's ResNets use the module names of timm's ResNet, so timm's own ResNet matcher groups them:
# the stem (conv1, bn1, maxpool) and one stage per layerN.
TORCHVISION_RESNET_MATCHER = {"stem": r"^conv1|^bn1|^maxpool", "blocks": r"^layer(\d+)"}
BN_MODES = ("train", "frozen", "frozen-affine")


def backbone_stages(backbone):
    """The backbone's parameter names grouped stem first, then one group per stage, from timm's own grouping:
    `group_matcher(coarse=True)` (one group per stage, plus any final 1x1 conv as the last one) read by
    timm's `group_parameters`. [[stem names], [stage 1 names], ..., [last stage names]]."""
    from timm.models import group_parameters
    matcher = getattr(backbone, "group_matcher", None)
    if matcher is not None:
        matcher = matcher(coarse=True)
    elif {"conv1", "layer1"} <= {name for name, _ in backbone.named_children()}:
        matcher = TORCHVISION_RESNET_MATCHER
    else:
        raise ValueError(f"{type(backbone).__name__} exposes no stage grouping (timm's group_matcher)")
    groups = group_parameters(backbone, matcher)
    return [groups[k] for k in sorted(groups)]


class TransferNet(nn.Module):
    """An ImageNet backbone with a new dropout + linear head for the target classes.

    How much of the backbone trains:
    - `freeze_backbone`: none of it (a fixed feature extractor);
    - `freeze_stages=K`: the stem and the first K stages are frozen, the rest trains (0: everything trains);
    - `bn_mode` for the BatchNorm layers that do train: `train` (batch statistics, running averages updated),
      `frozen` (ImageNet running statistics kept and used, affine weights train), `frozen-affine` (both fixed).
    Frozen parameters get no gradients, and frozen modules stay in eval mode (BatchNorm statistics fixed) even
    when the network is put in train mode. `forward` also accepts features the backbone already computed (a
    2-D tensor), which is how the feature cache trains the head alone.
    """

    def __init__(self, arch, num_classes, dropout=0.0, freeze_backbone=False, pretrained_imagenet=False,
                 freeze_stages=0, bn_mode="train"):
        super().__init__()
        self.backbone, self.num_features, self.mean, self.std = make_backbone(arch, pretrained_imagenet)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.num_features, num_classes))
        if bn_mode not in BN_MODES:
            raise ValueError(f"unknown BatchNorm mode {bn_mode!r}; choose {', '.join(BN_MODES)}")
        self.freeze_backbone, self.freeze_stages, self.bn_mode = freeze_backbone, freeze_stages, bn_mode
        self.stages = backbone_stages(self.backbone) if freeze_stages or freeze_backbone else None
        if freeze_stages and not 0 <= freeze_stages <= len(self.stages) - 1:
            raise ValueError(f"--freeze-stages {freeze_stages}: {arch} has {len(self.stages) - 1} stages after its "
                             f"stem, so K can be 0 to {len(self.stages) - 1}")
        frozen = set()
        if freeze_backbone:
            frozen = {name for name, _ in self.backbone.named_parameters()}
        elif freeze_stages:
            frozen = {name for group in self.stages[:freeze_stages + 1] for name in group}
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(name not in frozen)
        # A module is frozen when all its own parameters are; such modules (and, with --bn-mode frozen, every
        # BatchNorm) always run in eval mode. They are kept by name, not by reference: convert_sync_batchnorm
        # (--sync-bn) replaces the BatchNorm modules with new ones under the same names, which must stay frozen too.
        self._eval_names = set()
        for name, module in self.backbone.named_modules():
            own = [f"{name}.{n}" if name else n for n, _ in module.named_parameters(recurse=False)]
            is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
            if (own and all(n in frozen for n in own)) or (is_bn and bn_mode != "train"):
                self._eval_names.add(name)
            if is_bn and bn_mode == "frozen-affine":
                module.requires_grad_(False)
        self.train()

    def train(self, mode=True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        for name, module in self.backbone.named_modules():
            if name in self._eval_names:
                module.eval()
        return self

    def features(self, x):
        return self.backbone(x)

    def forward(self, x):
        return self.head(x if x.ndim == 2 else self.features(x))

    def param_groups(self, backbone_lr_mult=1.0, layer_decay=1.0):
        """Optimizer groups: the head at the full learning rate; each backbone stage at backbone_lr_mult times
        layer_decay ** (its distance from the head): the last stage gets one factor D, the stem the most."""
        groups = [{"params": list(self.head.parameters()), "lr_mult": 1.0}]
        trainable = {n: p for n, p in self.backbone.named_parameters() if p.requires_grad}
        if layer_decay == 1.0:
            groups.append({"params": list(trainable.values()), "lr_mult": backbone_lr_mult})
            return groups
        stages = backbone_stages(self.backbone)
        for depth, names in enumerate(reversed(stages), start=1):
            params = [trainable[n] for n in names if n in trainable]
            if params:
                groups.append({"params": params, "lr_mult": backbone_lr_mult * layer_decay ** depth})
        return groups


# ----------------------------------------------------------------------------- model building from config

def build_model(config):
    """Rebuild a model from the plain `model_config` dict stored in every checkpoint."""
    config = dict(config)
    kind = config.pop("kind")
    if kind == "cifar":
        return build_cifar_model(**config)
    if kind == "transfer":
        return TransferNet(config["arch"], config["num_classes"], config.get("dropout", 0.0),
                           config.get("freeze_backbone", False), freeze_stages=config.get("freeze_stages", 0),
                           bn_mode=config.get("bn_mode", "train"))
    raise ValueError(f"unknown model kind {kind!r}")


@contextlib.contextmanager
def frozen(module):
    """Every parameter of `module` without gradients inside the block, each as it was again after it."""
    was = {p: p.requires_grad for p in module.parameters()}
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in was.items():
            p.requires_grad_(flag)


def count_parameters(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def unwrap(model):
    """The plain nn.Module under torch.compile and DDP wrappers, in either order."""
    while hasattr(model, "_orig_mod") or isinstance(model, nn.parallel.DistributedDataParallel):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def module_outputs(model, input_shape=(1, 3, 32, 32)):
    """[(module, output shape)] of every module call in one forward pass on zeros, in the order they ran, the model
    itself first (torchinfo's summary, in eval mode; the model's mode is restored)."""
    from torchinfo import summary
    stats = summary(model, input_size=input_shape, device=next(model.parameters()).device, mode="eval", verbose=0)
    return [(info.module, tuple(info.output_size)) for info in stats.summary_list]


def architecture_table(model, input_shape=(1, 3, 32, 32)):
    """Markdown table of every leaf layer as it ran: name, type, output shape, parameters."""
    names = {m: n for n, m in model.named_modules()}
    lines = ["| layer | type | output shape | parameters |", "|---|---|---|---:|"]
    for module, shape in module_outputs(model, input_shape):
        if names.get(module) and not any(module.children()):
            lines.append(f"| {names[module]} | {type(module).__name__} | {'x'.join(map(str, shape[1:])) or '-'} | "
                         f"{sum(p.numel() for p in module.parameters(recurse=False)):,} |")
    total, trainable = count_parameters(model), count_parameters(model, trainable_only=True)
    lines.append(f"| **total** | | | **{total:,}** ({trainable:,} trainable) |")
    return "\n".join(lines)


def _stage_parts(model):
    """[(part name, [(module name, module)])] covering every parameter once: stem, stages, head.

    A transfer network uses its backbone's own stages (the grouping --freeze-stages uses); a CIFAR network's
    `features` are split where a layer with parameters changes the spatial size (a new stage), layers without
    parameters (ReLU, pooling) staying with the stage before them; `stem` before, everything after is the head."""
    named = dict(model.named_modules())
    if isinstance(model, TransferNet):
        parts = []
        for i, names in enumerate(backbone_stages(model.backbone)):
            mods = list(dict.fromkeys("backbone." + n.rsplit(".", 1)[0] for n in names))
            parts.append(("stem" if i == 0 else f"stage {i}", [(m, named[m]) for m in mods]))
        owned = {p for _, mods in parts for _, m in mods for p in m.parameters(recurse=False)}
        rest = [(n, m) for n, m in model.backbone.named_modules()
                if any(p not in owned for p in m.parameters(recurse=False))]  # none for timm/torchvision
        return parts + [("head", [(f"backbone.{n}", m) for n, m in rest] + [("head", model.head)])]
    children = dict(model.named_children())
    if "features" not in children:
        return [(n, [(n, m)]) for n, m in children.items()]
    shapes = {m: shape[2:] for m, shape in module_outputs(model)}
    stages, current = [], None
    for n, m in children["features"].named_children():
        has_params = any(True for _ in m.parameters())
        if current is None or (has_params and shapes[m] != current[1]):
            current = ([], shapes[m])
            stages.append(current)
        current[0].append((f"features.{n}", m))
    before = list(children).index("features")
    parts = [("stem", [(n, children[n]) for n in list(children)[:before]])] if before else []
    parts += [(f"stage {i + 1}", mods) for i, (mods, _) in enumerate(stages)]
    return parts + [("head", [(n, children[n]) for n in list(children)[before + 1:]])]


def stage_rows(model, input_shape=(1, 3, 32, 32)):
    """The compact, stage-level architecture: [(part, modules, output shape, parameters)] for the stem, each
    stage and the head (see _stage_parts). The parameters sum to the model's total."""
    parts = _stage_parts(model)
    part_of = {m: part for part, members in parts for _, m in members}
    outputs = module_outputs(model, input_shape)
    shapes = {part_of[m]: shape for m, shape in outputs if m in part_of}  # a part's output: its last module's to run
    shapes[parts[-1][0]] = outputs[0][1]  # the head's: the model's

    def short(name):  # backbone.layer1.0.conv1 -> backbone.layer1; backbone.blocks.0.0.conv_dw -> backbone.blocks.0
        bits = name.split(".")
        return ".".join(bits[:3] if len(bits) > 2 and bits[1] == "blocks" else bits[:2])

    return [(part, ", ".join(dict.fromkeys(short(n) for n, _ in members)), shapes.get(part, ()),
             sum(p.numel() for _, m in members for p in m.parameters())) for part, members in parts]


def stage_table(model, input_shape=(1, 3, 32, 32)):
    """stage_rows as a markdown table with a total row."""
    lines = ["| part | modules | output shape | parameters |", "|---|---|---|---:|"]
    for part, names, shape, n in stage_rows(model, input_shape):
        lines.append(f"| {part} | {names if len(names) < 50 else names[:47] + '...'} | "
                     f"{'x'.join(map(str, shape[1:])) or '-'} | {n:,} |")
    total, trainable = count_parameters(model), count_parameters(model, trainable_only=True)
    lines.append(f"| **total** | | | **{total:,}**{f' ({trainable:,} trainable)' if trainable != total else ''} |")
    return "\n".join(lines)


def architecture_markdown(model, title, input_shape=(1, 3, 32, 32)):
    """A run's architecture.md: the stage-level table (what the report shows), then every leaf layer."""
    return (f"# {title}\n\n## Stages\n\n{stage_table(model, input_shape)}\n\n## Every layer\n\n"
            f"{architecture_table(model, input_shape)}\n")


def main():
    parser = argparse.ArgumentParser(description="Print a CIFAR model's architecture tables (stages, then layers).")
    parser.add_argument("model", choices=CIFAR_MODELS, help="which network")
    parser.add_argument("--depth", type=int, default=8, help="conv layers (convnet), or the WRN depth (wrn)")
    parser.add_argument("--widen", type=int, default=10, help="widen factor (wrn)")
    parser.add_argument("--width", type=int, default=32, help="base channels (convnet)")
    parser.add_argument("--bn", action="store_true", help="BatchNorm after every conv (convnet)")
    parser.add_argument("--residual", action="store_true", help="residual pairs (convnet)")
    args = parser.parse_args()
    model = build_cifar_model(args.model, depth=args.depth, width=args.width, norm="bn" if args.bn else "none",
                              residual=args.residual, widen=args.widen)
    print(architecture_markdown(model, args.model))


if __name__ == "__main__":
    main()
