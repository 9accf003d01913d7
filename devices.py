"""Which device a run trains on, and what follows from it: `pick_device` (--device, or CUDA where visible; torchrun's
LOCAL_RANK GPU), the speed defaults it implies (`device_defaults`: bf16 autocast and compile on CUDA), bit-identical
reruns (`set_determinism`), and the DistributedDataParallel helpers every rank calls (`setup_distributed`: NCCL on
GPUs, gloo on CPUs; `barrier`, `reduce_sums`). Everything here decides from the device the run
resolved, never from whether CUDA merely exists. Not run directly.
"""
import os
import platform

import torch
import torch.distributed as dist


class DeviceError(Exception):
    """--device names no device this machine has: one sentence for the user (exit 2, as a bad flag)."""


def pick_device(name=None):
    """The device this process trains on, from --device (None: CUDA where visible, else the CPU), checked and made
    current; under torchrun, the process's LOCAL_RANK GPU. Everything device-dependent (process-group backend,
    amp/compile defaults, RNG state) is decided from this device, never from whether CUDA merely exists."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name} is not a device name (cuda, cuda:N or cpu)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name} asked for, but no CUDA GPU is visible")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def device_defaults(args, device):
    """Fill --amp, --compile and --channels-last left unset from the device the run resolved: bf16 autocast and compile
    on for CUDA, off on a CPU (bf16 can be slower there, on CPUs without bf16 units or with small models, and compiling
    costs more than it saves in a short run); channels-last on everywhere (faster for every model here on CPU too,
    BENCHMARKS.md). It changes args, as its name says."""
    for flag in ("amp", "compile"):
        if getattr(args, flag) is None:
            setattr(args, flag, device.type == "cuda")
    if args.channels_last is None:
        args.channels_last = True


def set_determinism(deterministic):
    """--deterministic: the same seed gives bit-identical runs on the same machine and software. On CUDA that
    needs cuBLAS's fixed workspace (set before its first use), no TF32, deterministic cuDNN algorithms, and
    no op without a deterministic kernel: such an op stops the run naming it instead of warning."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    # TF32 matmuls through the one API that device_images.exact_float32 also uses: torch >= 2.9 refuses to report
    # the precision once the legacy flag (torch.backends.cuda.matmul.allow_tf32) and this API have both set it
    torch.set_float32_matmul_precision("highest" if deterministic else "high")
    torch.backends.cudnn.allow_tf32 = not deterministic


def process_group_backend(device):
    return "nccl" if device.type == "cuda" else "gloo"


def setup_distributed(device):
    """(rank, world) under torchrun (which sets LOCAL_RANK and WORLD_SIZE), else (0, 1). The backend follows the device this
    process resolved: NCCL, bound to its GPU, for CUDA; gloo for CPU, also on a machine that has GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "LOCAL_RANK" not in os.environ:  # not launched by torchrun; one torchrun process still gets a group + DDP
        return 0, 1
    if not dist.is_initialized():
        backend = process_group_backend(device)
        dist.init_process_group(backend, **({"device_id": device} if backend == "nccl" else {}))
    return dist.get_rank(), world


def device_name(device):
    """The machine a run used, for the report: the GPU's name, or the CPU's with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def amp_dtype(device):
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device, enabled):
    return torch.autocast(device.type, dtype=amp_dtype(device), enabled=enabled)


def is_main():
    """Whether this process writes the run's files: rank 0 under torchrun, the only process otherwise."""
    return not dist.is_initialized() or dist.get_rank() == 0


def synchronize(device):
    """Wait until the device has run everything queued (a no-op on the CPU): before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def reduce_sums(*tensors):
    """Sum device tensors over all torchrun processes (no-op outside torchrun)."""
    if dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)
    return tensors
