"""The ResNet-18 of dpscale.models.resnet in plain torch, shared by the torch backends.

Module attribute names are chosen so that `state_dict()` names are exactly the canonical names
of `param_shapes(spec)` (conv OIHW, linear (out, in)), so weights map 1:1 without renaming.
No in-place ops: Opacus' backward hooks and torch.func's vmap both dislike them.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpscale.backends.base import Batch, Runtime, check_weights
from dpscale.models.resnet import GN_EPS, ResNetSpec, blocks, param_shapes


def _gn(spec: ResNetSpec, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(spec.gn_groups(channels), channels, eps=GN_EPS, affine=True)


def _conv(cin: int, cout: int, k: int, stride: int) -> nn.Conv2d:
    # Explicit symmetric padding k//2, as the spec demands (no "SAME").
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


class Downsample(nn.Module):
    """Named `conv` and `gn` (not a Sequential) to match `downsample.conv.weight` etc."""

    def __init__(self, spec: ResNetSpec, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = _conv(cin, cout, 1, stride)
        self.gn = _gn(spec, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gn(self.conv(x))


class BasicBlock(nn.Module):
    def __init__(self, spec: ResNetSpec, cin: int, cout: int, stride: int, down: bool) -> None:
        super().__init__()
        self.conv1 = _conv(cin, cout, 3, stride)
        self.gn1 = _gn(spec, cout)
        self.conv2 = _conv(cout, cout, 3, 1)
        self.gn2 = _gn(spec, cout)
        self.downsample = Downsample(spec, cin, cout, stride) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet18(nn.Module):
    def __init__(self, spec: ResNetSpec) -> None:
        super().__init__()
        self.spec = spec
        k = 3 if spec.stem_kind == "cifar" else 7
        self.conv1 = _conv(spec.in_channels, spec.width, k, 1 if k == 3 else 2)
        self.gn1 = _gn(spec, spec.width)
        # torch's max pool pads with -inf, as the spec asks.
        self.maxpool = nn.MaxPool2d(3, 2, 1) if spec.stem_kind == "imagenet" else nn.Identity()
        stages: dict[str, list[BasicBlock]] = {}
        for prefix, cin, cout, stride, down in blocks(spec):
            stage = prefix.split(".")[0]
            stages.setdefault(stage, []).append(BasicBlock(spec, cin, cout, stride, down))
        for stage, mods in stages.items():
            setattr(self, stage, nn.Sequential(*mods))
        self.fc = nn.Linear(spec.widths()[-1], spec.num_classes)
        names = [n for n, _ in self.named_parameters()]
        if names != list(param_shapes(spec)):
            raise AssertionError("torch ResNet18 parameter names differ from the canonical spec")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.gn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def set_threads(threads: int) -> None:
    """Intra-op threads; the runner's environment (OMP_NUM_THREADS, ...) already says the same."""
    torch.set_num_threads(max(1, int(threads)))


def to_images(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """(n, H, W, C) float32 NHWC from the runner -> NCHW torch tensor."""
    return (
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        .permute(0, 3, 1, 2)
        .to(device, memory_format=torch.contiguous_format)
    )


def to_labels(y: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)


def to_mask(mask: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(mask, dtype=bool)).to(device)


def load_canonical(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Copy canonical weights into `model`; any missing, extra or misshapen name is an error."""
    params = dict(model.named_parameters())
    check_weights(weights, {n: tuple(p.shape) for n, p in params.items()})
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(np.asarray(weights[name], dtype=np.float32)))


def real_rows(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's real examples as (images, labels): torch is eager, padding is sliced away."""
    mask = np.asarray(batch.mask, dtype=bool)
    return to_images(batch.x[mask], device), to_labels(batch.y[mask], device)


def tensors_like(arrays: dict[str, np.ndarray], params: dict[str, torch.Tensor]) -> dict:
    """`arrays` (e.g. a checkpoint's momentum) as tensors on each parameter's device and dtype;
    every parameter must have one."""
    missing = sorted(set(params) - set(arrays))
    if missing:
        raise ValueError(f"checkpoint lacks momentum for {missing[:3]}; expected every parameter")
    return {
        n: torch.from_numpy(np.asarray(arrays[n])).to(p.device, p.dtype) for n, p in params.items()
    }


def export_canonical(model: nn.Module) -> dict[str, np.ndarray]:
    return {
        n: p.detach().cpu().numpy().astype(np.float32, copy=True)
        for n, p in model.named_parameters()
    }


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, device: torch.device, chunk: int = 256) -> np.ndarray:
    model.eval()
    out = [
        model(to_images(x[i : i + chunk], device)).float().cpu().numpy()
        for i in range(0, len(x), chunk)
    ]
    model.train()
    if not out:
        return np.zeros((0, model.spec.num_classes), np.float32)
    return np.concatenate(out).astype(np.float32)


def versions() -> dict[str, str]:
    return {"torch": torch.__version__, "numpy": np.__version__}


def peak_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def device_name(device: torch.device) -> str:
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"


class TorchModel:
    """The model and device halves of the Adapter contract for a torch adapter holding `model`
    on `_device` (which `pick_device` chooses), and its data parallelism over processes
    (torch.distributed: gloo on CPUs, NCCL on GPUs, one GPU per rank): the adapter names the
    tensors it accumulates into (`_grad_sums`), `_all_reduce` sums them over the ranks."""

    model: nn.Module
    _device: torch.device
    framework = "PyTorch"
    multi_device = True

    @property
    def gpu_fix(self) -> str:
        if torch.version.cuda is None:
            return (
                f"torch {torch.__version__} is a CPU build; build the cuda env (accelerator: cuda)"
            )
        return (
            f"torch {torch.__version__} is built for CUDA {torch.version.cuda}: check the node's "
            "driver (nvidia-smi; CUDA 13 needs R580 or newer, else pin torch 2.10.0, CUDA 12)"
        )

    def pick_device(self) -> torch.device:
        """The device of this process: cuda:LOCAL_RANK of a data-parallel run's GPUs."""
        gpu = self.use_gpu()
        local = self._join_process_group(gpu) if self.runtime.devices > 1 else 0
        return torch.device("cuda", local) if gpu else torch.device("cpu")

    def _join_process_group(self, gpu: bool) -> int:
        """Join the run's torch.distributed group from the launcher's environment (RANK,
        WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); return the local rank."""
        import torch.distributed as dist

        n, env = self.runtime.devices, os.environ
        if "RANK" not in env or env.get("WORLD_SIZE") != str(n):
            raise ValueError(
                f"training.devices={n} needs {n} processes with RANK and WORLD_SIZE={n} set; "
                "expected the launch by python -m dpscale.runner, which starts them"
            )
        self.rank, self.workers = int(env["RANK"]), n
        local = int(env.get("LOCAL_RANK", self.rank))
        if gpu:
            if torch.cuda.device_count() <= local:
                raise ValueError(
                    f"rank {self.rank} wants GPU {local}, torch sees {torch.cuda.device_count()}"
                    f"; expected training.devices={n} GPUs visible to the run"
                )
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if gpu else "gloo", rank=self.rank, world_size=n)
        return local

    def _grad_sums(self) -> list[torch.Tensor]:
        """The tensors the adapter's _accumulate has summed into (created if still absent)."""
        raise NotImplementedError

    def _all_reduce(self, loss_sum: float, count: int) -> tuple[float, int]:
        if self.workers == 1:
            return loss_sum, count
        import torch.distributed as dist

        sums = self._grad_sums()
        # One collective for all gradient sums (a flat copy), one for the loss sum and count.
        flat = torch.cat([t.reshape(-1) for t in sums])
        dist.all_reduce(flat)
        offset = 0
        for t in sums:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        stats = torch.tensor([loss_sum, count], dtype=torch.float64, device=self._device)
        dist.all_reduce(stats)
        return float(stats[0]), int(stats[1])

    def close(self) -> None:
        if self.workers > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def _configure(self, runtime: Runtime) -> None:
        # torch defaults differ by op (TF32 convolutions on, matmuls off): one policy for both.
        tf32 = runtime.precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        if runtime.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS' requirement
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False

    def _visible_devices(self) -> list[str]:
        if not torch.cuda.is_available():
            return ["cpu"]
        return [device_name(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]

    def synchronize(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def device(self) -> str:
        return device_name(self._device)

    def peak_memory_bytes(self) -> int | None:
        return peak_memory_bytes(self._device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def get_weights(self) -> dict[str, np.ndarray]:
        return export_canonical(self.model)

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        load_canonical(self.model, weights)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return predict(self.model, x, self._device)

    def freeze(self, names: list[str]) -> None:
        params = dict(self.model.named_parameters())
        unknown = sorted(set(names) - set(params))
        if unknown:
            raise ValueError(f"cannot freeze {unknown[:3]}: not parameters of the model")
        for name in names:
            params[name].requires_grad_(False)

    def trainable(self) -> dict[str, nn.Parameter]:
        """The parameters DP-SGD updates (and clips and noises): all but the frozen ones."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}
