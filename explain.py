"""Where a network looked: Grad-CAM (Selvaraju et al. 2017) for a class on the network's last convolutional stage,
computed by captum's LayerGradCam (PyTorch's interpretability library), and the pictures that show it: one image with
its heat map and top-3 names (`draw`), or a grid comparing models on the same images (`compare_grid`), and the
report's Grad-CAM figures (`gradcam_figures`: birds under the frozen probe and LP-FT, CIFAR's most-confused pair).
predict.py --explain and report.py use it. Not run directly.
"""
import csv
import json
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


# ----------------------------------------------------------------------------- the report's figures

def gradcam_column(run_dir, images, labels, size=None):
    """One model's Grad-CAM column for compare_grid: its best.pt on `images` (bird samples (path, label, crop box), or
    CIFAR uint8 (N, 3, 32, 32)) through its own evaluation preprocessing (its loader's resize and centre crop, of the
    crop box where it has one), the map of its top class at `size` px, and a caption with its prediction against the
    true `labels`. Returns (pictures, column)."""
    import bird_data
    import bird_loaders
    import checkpoints
    import data
    import predict
    device = torch.device("cpu")
    ckpt = checkpoints.load_checkpoint(run_dir / "best.pt")
    model, cfg = predict.load_model(ckpt, run_dir / "best.pt", device), ckpt["data_config"]
    if torch.is_tensor(images):
        loader = data.DeviceLoader(images, torch.arange(len(images)), len(images), mean=cfg["mean"], std=cfg["std"])
    else:
        loader = bird_loaders.bird_loader("torch", images, cfg["img_size"], len(images), False, cfg["mean"], cfg["std"],
                                          device, workers=0)
    x, _ = next(iter(loader))
    with torch.no_grad():
        probs = model.eval()(x).float().softmax(1)
    top_p, top_c = probs.max(1)
    _, layer = last_conv_stage(model, (1, *x.shape[1:]))
    cams = grad_cam(model, layer, x, top_c)
    size = size or x.shape[-1]
    cams = torch.nn.functional.interpolate(cams[:, None], size=(size, size), mode="bilinear")[:, 0].numpy()
    names = cfg.get("classes")  # a checkpoint from before names were stored: its run's per_class.csv has them
    if names is None and (run_dir / "per_class.csv").is_file():
        with open(run_dir / "per_class.csv", newline="") as f:
            names = [bird_data.display_name(r["name"]) for r in csv.DictReader(f)]
    names = names or [str(i) for i in range(probs.shape[1])]
    captions = [f"{'right' if c == y else 'wrong'}: {names[c][:22]} ({p:.2f})"
                for c, p, y in zip(top_c.tolist(), top_p.tolist(), labels, strict=True)]
    pictures = [to_picture(xi, cfg["mean"], cfg["std"]) for xi in x]
    return pictures, (cams, captions, names)


def gradcam_figures(results, runs, finals, n=6):
    """The Grad-CAM figures: (png name, what it shows), drawn into results. Birds: n test images spread over the
    classes, under the frozen probe (`frozen`) and LP-FT (`lpft`), each model's map for its own top class. CIFAR: the
    final model on validation images of its most-confused pair of classes (confusion_val.csv)."""
    import bird_data
    figures = []
    frozen, lpft = runs.get(("birds", "frozen")), runs.get(("birds", "lpft"))
    if frozen and lpft and (frozen[0] / "best.pt").is_file() and (lpft[0] / "best.pt").is_file():
        _, test, _ = bird_data.run_samples(json.loads((lpft[0] / "config.json").read_text())["args"])
        test = [t for t in test if bird_data.check_image_file(t[0]) is None]
        chosen = test[:: max(1, len(test) // n)][:n]  # with their crop boxes where the runs trained on them
        labels = [y for _, y, _ in chosen]
        pictures, lp = gradcam_column(lpft[0], chosen, labels)
        _, fr = gradcam_column(frozen[0], chosen, labels, size=pictures[0].shape[0])
        names = lp[2]
        compare_grid(results / "birds_gradcam.png", pictures,
                     [("frozen probe", fr[0], fr[1]), ("LP-FT (fine-tuned)", lp[0], lp[1])],
                     "Where each bird model looks: Grad-CAM of its top class")
        figures.append(("birds_gradcam.png", f"Six test birds ({', '.join(names[y] for y in labels)}), each under "
                        "the frozen probe and under LP-FT, with each model's top class and its probability: the "
                        "frozen column is ImageNet's features as the new head weighs them, the LP-FT column the "
                        "evidence after the whole network adapted to these species."))
    cifar = finals.get("cifar")
    if cifar is not None and (cifar / "best.pt").is_file() and (cifar / "confusion_val.csv").is_file():
        import data
        rows = csv.reader((cifar / "confusion_val.csv").read_text().splitlines()[1:])
        matrix = [[int(v) for v in row[1:]] for row in rows]
        _, t, p = max((matrix[t][p], t, p) for t in range(len(matrix)) for p in range(len(matrix)) if t != p)
        args = json.loads((cifar / "config.json").read_text())["args"]
        loaded = data.load_cifar100(args["data_dir"])
        _, val_idx = data.stratified_split(loaded["train_y"], val_per_class=args["val_per_class"],
                                           seed=args["split_seed"])
        picks = [i for c in (t, p) for i in [j for j in val_idx if loaded["train_y"][j] == c][:2]]
        images = torch.from_numpy(loaded["train_x"][picks])
        pictures, col = gradcam_column(cifar, images, [int(loaded["train_y"][i]) for i in picks])
        compare_grid(results / "cifar_gradcam.png", pictures, [(cifar.parent.name, col[0], col[1])],
                     f"CIFAR: {col[2][t]} vs {col[2][p]}, the most-confused pair")
        figures.append(("cifar_gradcam.png", f"The final CIFAR model (`{cifar.parent.name}`) on validation images of "
                        f"its most-confused pair: two {col[2][t]} then two {col[2][p]} ({matrix[t][p]} validation "
                        f"{col[2][t]} were called {col[2][p]})."))
    return figures
