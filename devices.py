"""Which device a run trains on, and what follows from it: `pick_device` (--device, or CUDA where visible; torchrun's
LOCAL_RANK GPU; a GPU this torch cannot use, because its driver is older than torch's CUDA build, is one sentence
with the install line that fits, `unusable_gpu`), the speed defaults it implies (`device_defaults`: bf16 autocast and
compile on CUDA), bit-identical reruns (`set_determinism`), and the DistributedDataParallel helpers every rank calls
(`setup_distributed`: NCCL on GPUs, gloo on CPUs; `barrier`, `reduce_sums`). Everything here decides from the device
the run resolved, never from whether CUDA merely exists.

    python devices.py            # what this machine gives a run: torch, driver, GPUs, compile, loaders, threads
    python devices.py --short    # three lines (run_all.sh prints them above its plan); exit 2 on an unusable GPU
"""
import contextlib
import functools
import importlib.metadata
import math
import os
import platform
import re
import shutil
import subprocess
import sys

import torch
import torch.distributed as dist


class DeviceError(Exception):
    """--device names no device this machine has: one sentence for the user (exit 2, as a bad flag)."""


# The oldest Linux driver each CUDA release runs on (NVIDIA's CUDA Toolkit release notes, table 3): what a driver
# reported only by /proc/driver/nvidia/version (no nvidia-smi) supports
CUDA_OF_DRIVER = ((580, "13.0"), (575, "12.9"), (570, "12.8"), (560, "12.6"), (555, "12.5"), (550, "12.4"),
                  (545, "12.3"), (535, "12.2"), (530, "12.1"), (525, "12.0"), (520, "11.8"), (450, "11.0"))
CUDA12_WHEELS = "https://download.pytorch.org/whl/cu126"  # torch's CUDA 12 builds: any driver of 525 or newer


@functools.cache
def nvidia_driver():
    """The NVIDIA driver on this machine, whether or not torch can use it, or None: {"version": "550.54.15", "cuda":
    "12.4" (the newest CUDA it runs), "gpus": [(name, memory in MiB)]}, from nvidia-smi, else from
    /proc/driver/nvidia/version (no GPU names there)."""
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            banner = subprocess.run([exe], capture_output=True, text=True, timeout=20).stdout
            rows = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            banner = rows = ""
        gpus = [[v.strip() for v in row.split(",")] for row in rows.splitlines() if row.count(",") >= 2]
        version = re.search(r"Driver Version:\s*([\d.]+)", banner)
        cuda = re.search(r"CUDA Version:\s*([\d.]+)", banner)
        if version or gpus:
            version = version.group(1) if version else gpus[0][2]
            return {"version": version, "cuda": cuda.group(1) if cuda else driver_cuda(version),
                    "gpus": [(g[0], int(float(g[1])) if g[1].replace(".", "").isdigit() else None) for g in gpus]}
    try:
        with open("/proc/driver/nvidia/version") as f:
            return proc_driver(f.read())
    except OSError:
        return None


def proc_driver(text):
    """nvidia_driver's answer from the text of /proc/driver/nvidia/version ("NVRM version: NVIDIA UNIX x86_64 Kernel
    Module  550.54.15  ..."): the version, and the CUDA it runs from CUDA_OF_DRIVER; no GPU names."""
    found = re.search(r"Kernel Module(?: for \w+)?\s+([\d.]+)", text) or re.search(r"\s(\d{3}\.[\d.]+)\s", text)
    version = found.group(1) if found else "of unknown version"
    return {"version": version, "cuda": driver_cuda(version), "gpus": []}


def driver_cuda(version):
    """The newest CUDA a Linux driver of this version runs (CUDA_OF_DRIVER), or None."""
    major = int(version.split(".")[0]) if version[:1].isdigit() else 0
    return next((cuda for oldest, cuda in CUDA_OF_DRIVER if major >= oldest), None)


def gpus_hidden():
    """Whether CUDA_VISIBLE_DEVICES hides every GPU on purpose (set empty, or to -1)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible is not None and visible.strip() in ("", "-1", "NoDevFiles")


def major(cuda):
    return int(str(cuda).split(".")[0]) if cuda else 0


def install_line(driver):
    """The pip lines whose wheels run on this driver."""
    if major(driver.get("cuda")) >= 13:
        return "pip install --force-reinstall torch torchvision torchcodec nvidia-dali-cuda130"
    if major(driver.get("cuda")) == 12:
        return (f"pip install --force-reinstall torch torchvision torchcodec --index-url {CUDA12_WHEELS} && "
                f"pip install nvidia-dali-cuda120 (and pip uninstall nvidia-dali-cuda130)")
    return "update the NVIDIA driver to 525 or newer (current torch wheels need CUDA 12 at least)"


def unusable_gpu():
    """One sentence where this machine has an NVIDIA GPU that this torch cannot use (its driver older than torch's
    CUDA build, or a torch built without CUDA), naming the GPU, the driver and the CUDA it runs, torch's CUDA build
    and the install line that fits; None where torch sees a GPU, no NVIDIA driver shows, or CUDA_VISIBLE_DEVICES hides
    the GPUs on purpose."""
    if torch.cuda.is_available() or gpus_hidden():
        return None
    driver = nvidia_driver()
    if driver is None:
        return None
    names = ", ".join(name for name, _ in driver["gpus"]) or "an NVIDIA GPU"
    built = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}" if torch.version.cuda
             else f"torch {torch.__version__} is built without CUDA")
    cuda = f"CUDA {driver['cuda']}" if driver["cuda"] else "an unknown CUDA"
    return (f"this machine has {names} (driver {driver['version']}, which runs up to {cuda}), but {built}, so it sees "
            f"no GPU; install the builds that fit: {install_line(driver)}; or pass --device cpu to run on the CPU "
            f"on purpose")


class OutOfMemory(Exception):
    """A CUDA out-of-memory error as one sentence: the batch that did not fit, the GPU's memory, and the flag that
    fits it (exit 1)."""


def memory_text(device):
    """The device's memory, for an out-of-memory sentence: "the 24 GiB of NVIDIA GeForce RTX 4090"."""
    if device.type != "cuda":
        return f"the memory of {device.type}"
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    return f"the {total:.0f} GiB of {torch.cuda.get_device_name(device)}"


def training_oom(device, batch, accum, epoch, step):
    """The sentence for a training step out of memory: the --accum-steps that halves its micro-batch, and where
    last.pt resumes (step None: not saved at this step, as under DDP, where its last save stands)."""
    now = f"as {accum} x {math.ceil(batch / accum)}" if accum > 1 else "at once"
    fix = accum * 2
    if fix > batch:
        return (f"out of GPU memory in a training step: even one image at a time does not fit in {memory_text(device)}; "
                f"a smaller model or image size, or --amp, would")
    where = (f"last.pt is saved at epoch {epoch + 1} step {step}: the same command with --resume --accum-steps {fix} "
             f"goes on from there" if step is not None else
             f"under torchrun no rank saves at this step (the others wait in its all-reduce until torchrun ends them): "
             f"the same command with --resume --accum-steps {fix} goes on from its last.pt (the last finished "
             f"epoch's), or afresh where it has none")
    return (f"out of GPU memory in a training step: the batch of {batch} ({now}) does not fit in {memory_text(device)}; "
            f"--accum-steps {fix} keeps the batch of {batch} as {fix} x {math.ceil(batch / fix)} (the same recipe; "
            f"BatchNorm sees the smaller micro-batches); {where}")


def evaluation_oom(device, batch):
    """The sentence for an evaluation or prediction batch out of memory."""
    return (f"out of GPU memory evaluating a batch of {batch} images: it does not fit in {memory_text(device)}; "
            f"--batch-size {max(1, batch // 2)} halves it for predict.py, and a training run with --accum-steps 2 "
            f"evaluates in its micro-batches (last.pt holds its last finished epoch: add --resume)")


@contextlib.contextmanager
def evaluation_memory(device, batch):
    """An evaluation forward pass whose CUDA out-of-memory error becomes evaluation_oom's sentence."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise OutOfMemory(evaluation_oom(device, batch)) from None


def pick_device(name=None):
    """The device this process trains on, from --device (None: CUDA where visible, else the CPU), checked and made
    current; under torchrun, the process's LOCAL_RANK GPU. A GPU this torch cannot use stops the run in one sentence
    (`unusable_gpu`) unless --device cpu asks for the CPU. Everything device-dependent (process-group backend,
    amp/compile defaults, RNG state) is decided from this device, never from whether CUDA merely exists."""
    if name is None or str(name).startswith("cuda"):  # --device cpu: the CPU on purpose, whatever the machine has
        why = unusable_gpu()
        if why is not None:
            raise DeviceError(why[0].upper() + why[1:])
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


def cpu_name():
    """The CPU's model name (/proc/cpuinfo), else what platform knows of it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_name(device):
    """The machine a run used, for the report: the GPU's name, or the CPU's with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def bf16_native(device):
    """Whether this CUDA device computes bf16 in hardware (compute capability 8.0+: Ampere, Hopper, Ada, Blackwell;
    ROCm). Not torch.cuda.is_bf16_supported(): by default it says yes where bf16 is only emulated (T4, V100, Turing),
    which runs autocast far slower than fp16; and it asks the current device, not the run's."""
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


def amp_dtype(device):
    """The autocast dtype of the run's device: fp16 (with loss scaling: engine's GradScaler) on a GPU without bf16
    in hardware, bf16 elsewhere."""
    if device.type == "cuda" and not bf16_native(device):
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


# ----------------------------------------------------------------------------- python devices.py: the machine, checked

def package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def dali_build():
    """(package, version, the CUDA major it is built for) of the installed DALI wheel, or None."""
    for cuda in (13, 12, 11):
        version = package_version(f"nvidia-dali-cuda{cuda}0")
        if version:
            return f"nvidia-dali-cuda{cuda}0", version, cuda
    return None


def dali_too_new():
    """One sentence where the installed DALI is built for a newer CUDA than this machine's driver runs, else None."""
    build, driver = dali_build(), nvidia_driver()
    if build is None or driver is None or not driver["cuda"] or build[2] <= major(driver["cuda"]):
        return None
    return (f"{build[0]} {build[1]} is built for CUDA {build[2]}, which driver {driver['version']} (CUDA "
            f"{driver['cuda']}) does not run; pip install nvidia-dali-cuda{major(driver['cuda'])}0 for it, or --loader "
            f"nvjpeg")


def compile_status(device):
    """(whether torch.compile can run on this device here, what it rests on or what is missing)."""
    if device.type == "cuda":
        triton = package_version("triton")
        return (True, f"Triton {triton}") if triton else (False, "no Triton: pip install triton, or --no-compile")
    compiler = next((c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c)), None)
    return (True, f"C++ compiler {compiler}") if compiler else (False, "no C++ compiler: install g++, or --no-compile")


def gpu_lines():
    """One line per GPU torch sees: name, memory, compute capability, the autocast dtype it gets."""
    lines = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(i)
        bf16 = bf16_native(torch.device("cuda", i))
        lines.append(f"GPU {i}: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
                     f"{props.major}.{props.minor}, {'bf16' if bf16 else 'fp16 (with loss scaling; no bf16)'} autocast")
    return lines


def machine_report():
    """(lines, mismatches): what a run gets on this machine, and each mismatch with its fix."""
    import bird_loaders  # here, not at the top: a run that never asks pays nothing for it
    driver, mismatches = nvidia_driver(), []
    why = unusable_gpu()
    if why:
        mismatches.append(why)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines = [f"torch {torch.__version__}, built for "
             + (f"CUDA {torch.version.cuda}" if torch.version.cuda else "the CPU only")
             + f"; Python {platform.python_version()}, {platform.system()} {platform.machine()}",
             "NVIDIA driver: " + (f"{driver['version']}, runs CUDA up to {driver['cuda'] or '?'}" if driver
                                  else "none (no nvidia-smi, no /proc/driver/nvidia/version)")]
    lines += gpu_lines() or ["GPU: none that torch sees; runs use the CPU"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines.append(f"CPU: {cpu_name()}, {cores} cores this process may use, "
                 f"{torch.get_num_threads()} torch threads")
    ok, what = compile_status(device)
    lines.append(f"torch.compile on {device.type}: {'can run' if ok else 'cannot run'} ({what})")
    if not ok and device.type == "cuda":
        mismatches.append(f"torch.compile cannot run on the GPU: {what}")
    build, codec = dali_build(), package_version("torchcodec")
    lines.append("DALI: " + (f"{build[0]} {build[1]}" if build else "not installed (--loader dali unavailable)")
                 + "; TorchCodec: " + (codec or "not installed (nvjpeg uses torchvision's decoder)"))
    if dali_too_new():
        mismatches.append(dali_too_new())
    if build and torch.version.cuda and build[2] != major(torch.version.cuda):
        mismatches.append(f"{build[0]} (CUDA {build[2]}) beside torch's CUDA {torch.version.cuda}: two CUDA runtimes "
                          f"in one process; pip install nvidia-dali-cuda{major(torch.version.cuda)}0 to match")
    lines.append(f"--loader auto on {device.type}: {bird_loaders.default_loader(device, say=False)}; --workers: "
                 f"{bird_loaders.default_workers()} (this process's share of the cores, at most 16)")
    return lines, mismatches


def main(argv=None):
    short = "--short" in (sys.argv[1:] if argv is None else argv)
    lines, mismatches = machine_report()
    if short:
        lines = [f"{lines[0]}; {lines[1]}", lines[2], lines[-1]]
    print("\n".join(lines))
    for line in mismatches:
        print(f"mismatch: {line}")
    if not mismatches and not short:
        print("no mismatch")
    return 2 if unusable_gpu() else 0


if __name__ == "__main__":
    sys.exit(main())
