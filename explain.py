"""Where a network looked: Grad-CAM (Selvaraju et al. 2017) for a class on the network's last convolutional stage,
computed by captum's LayerGradCam (PyTorch's interpretability library), and the pictures that show it: one image with
its heat map and top-3 names (`draw`), or a grid comparing models on the same images (`compare_grid`). predict.py
--explain and the report use it. Not run directly.
"""
import warnings

import numpy as np
import torch

from run_files import atomic_write


class NotConvolutional(ValueError):
    """A network whose last spatial layer Grad-CAM cannot use (a transformer's patch tokens)."""


def transformer_family(model):
    """The family name of a ViT/DeiT/Swin-style network (attention over patch tokens), else None. Its last 4-D output
    is the patch embedding (ViT, DeiT) or a channels-last token grid (Swin): no map of where it looked."""
    attention = any(isinstance(m, torch.nn.MultiheadAttention) or type(m).__name__.endswith("Attention")
                    and hasattr(m, "qkv") for m in model.modules())
    if attention or any(hasattr(m, "patch_embed") for m in model.modules()):
        inner = getattr(model, "backbone", model)  # TransferNet's timm or torchvision network
        return type(inner).__name__
    return None


def check_convolutional(model):
    """NotConvolutional, in one sentence naming the family, for a transformer (see transformer_family)."""
    family = transformer_family(model)
    if family is not None:
        raise NotConvolutional(f"Grad-CAM here needs a convolutional network, and {family} is a transformer "
                               f"(ViT/DeiT/Swin-style: attention over patch tokens, no last convolutional stage); "
                               f"predict without --explain")


def last_conv_stage(model, input_shape):
    """(name, module) of the network's last convolutional stage: the last module, in the order a forward pass on zeros
    of `input_shape` finishes them, whose output is a feature map (4-D, more than one pixel), after its activation. A
    torchvision ResNet: its layer4; timm's EfficientNet: its head's BatchNorm-activation; a Wide or PreAct ResNet: the
    ReLU after its last BatchNorm (in place: captum clones what it hooks, so the map is the ReLU's output); BaseNet: its
    second max-pool. A transformer (ViT, DeiT, Swin) is refused in one sentence (NotConvolutional)."""
    check_convolutional(model)
    seen = []
    hooks = [module.register_forward_hook(lambda m, _, out, name=name: seen.append((name, m, out)))
             for name, module in model.named_modules() if module is not model]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_shape, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    maps = [(name, m) for name, m, out in seen if torch.is_tensor(out) and out.ndim == 4 and out.shape[-2:].numel() > 1]
    if not maps:
        raise NotConvolutional(f"{type(model).__name__} has no layer with a spatial output for Grad-CAM")
    return maps[-1]


CHUNK = 32  # images per Grad-CAM backward pass, whatever the batch: its memory stays that of 32 images (BENCHMARKS.md)


def grad_cam(model, layer, x, targets):
    """Grad-CAM maps of `targets` (one class per image) for the batch x, as (N, H, W) float in [0, 1] at the input's
    size: the layer's activations weighted by their spatially averaged gradients, ReLU'd, bilinearly upsampled and
    divided by each map's maximum (a map with no positive evidence stays 0). Computed CHUNK images at a time."""
    with warnings.catch_warnings():  # captum imports tqdm.auto, which warns in a notebook without ipywidgets
        warnings.simplefilter("ignore")
        from captum.attr import LayerAttribution, LayerGradCam
    model.eval()
    cam, out = LayerGradCam(model, layer), []
    # No gradient is wanted but the layer's (captum makes its output require one): with the weights and the input
    # needing none, the backward pass keeps no activation before the layer, only those after it (the head)
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        for xs, ts in zip(x.split(CHUNK), targets.split(CHUNK), strict=True):
            with torch.enable_grad():
                attr = cam.attribute(xs.float().detach(), target=ts.tolist(), relu_attributions=True)
            maps = LayerAttribution.interpolate(attr.detach().float(), tuple(x.shape[-2:]), "bilinear")[:, 0]
            maps = maps.clamp(min=0)
            out.append((maps / maps.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1)).cpu())
            del attr, maps
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return torch.cat(out) if out else torch.zeros(0, *x.shape[-2:])


def to_picture(x, mean, std):
    """The network's normalised input (3, H, W) back to the uint8 (H, W, 3) picture it saw."""
    mean = torch.tensor(mean if mean is not None else [0.0] * 3).view(3, 1, 1)
    std = torch.tensor(std if std is not None else [1.0] * 3).view(3, 1, 1)
    return ((x.detach().float().cpu() * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _overlay(ax, picture, cam):
    big = max(1, 128 // picture.shape[0])  # a 32-px CIFAR view drawn as 128 px, its pixels kept sharp
    picture = np.kron(picture, np.ones((big, big, 1), dtype=np.uint8)) if big > 1 else picture
    cam = np.kron(cam, np.ones((big, big))) if big > 1 else cam
    ax.imshow(picture)
    ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    _plt().close(fig)


def draw(path, picture, cam, top, title=""):
    """One PNG: the photo as the network saw it, the Grad-CAM map over it, and the top-3 (name, probability)."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(7, 4.1))
    ax1.imshow(picture)
    ax1.set(xticks=[], yticks=[], title="the network's view")
    _overlay(ax2, picture, cam)
    ax2.set_title(f"Grad-CAM: {top[0][0]}")
    fig.suptitle(title, fontsize=9)
    fig.text(0.5, 0.02, "   ".join(f"{i}. {name} ({p:.2f})" for i, (name, p) in enumerate(top[:3], 1)),
             ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    _save(fig, path)


def compare_grid(path, pictures, columns, title):
    """Rows of images, one column per model: `columns` = [(column title, [map per image], [caption per image])]; the
    first column shows the picture alone."""
    plt = _plt()
    rows, cols = len(pictures), len(columns) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.0 * rows), squeeze=False)
    for r, picture in enumerate(pictures):
        axes[r, 0].imshow(picture)
        axes[r, 0].set(xticks=[], yticks=[])
        for c, (name, cams, captions) in enumerate(columns, 1):
            _overlay(axes[r, c], picture, cams[r])
            axes[r, c].set_title(f"{name}\n{captions[r]}" if r == 0 else captions[r], fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / rows))  # room for the title above the first row's captions
    _save(fig, path)
