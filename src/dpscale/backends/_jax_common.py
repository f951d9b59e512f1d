"""Pieces shared by the JAX-based backends (objax, jax) that import no framework.

Both backends run in their own venvs with different JAX releases (0.5.3 for Objax, current
for jax), so everything here is plain numpy/stdlib and works under either.
"""

from __future__ import annotations

import os

import numpy as np

from dpscale.backends._xla_cache import cache_dir

# XLA's CPU client has no "use N threads" option: the pool is sized by the CPUs the process may
# run on (a SLURM cgroup or taskset bounds it). One thread can be forced with these two flags.
SINGLE_THREAD_FLAGS = ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1")
# XLA's GPU determinism (jaxlib 0.5.3 and 0.10.2 both know it; ignored on a CPU).
DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def joined(flags: list[str]) -> str:
    """XLA_FLAGS text with every --flag before any non-flag token: XLA stops reading at the
    first non-flag token (intra_op_parallelism_threads=1), so a flag after it would be lost."""
    return " ".join(
        [f for f in flags if f.startswith("-")] + [f for f in flags if not f.startswith("-")]
    )


def xla_flags(threads: int, current: str = "") -> str:
    """XLA_FLAGS for a run limited to `threads` threads (only 1 can be enforced); `current` kept."""
    flags = current.split()
    if int(threads) == 1:
        flags += [f for f in SINGLE_THREAD_FLAGS if f not in flags]
    return joined(flags)


def configure_threads(threads: int) -> bool:
    """Set XLA_FLAGS before the first computation (XLA reads them when its CPU client starts).

    Returns False if a JAX backend was already started in this process, so the flags are late.
    """
    os.environ["XLA_FLAGS"] = xla_flags(threads, os.environ.get("XLA_FLAGS", ""))
    try:
        from jax._src import xla_bridge

        return not xla_bridge._backends
    except (ImportError, AttributeError):  # private API: a missing name means "can't tell"
        return True


def compilation_cache_dir(option) -> str | None:
    """XLA's persistent cache for JAX (_xla_cache.cache_dir; $JAX_COMPILATION_CACHE_DIR wins)."""
    return cache_dir(option, "JAX_COMPILATION_CACHE_DIR", "jax-cache")


def enable_compilation_cache(jax_module, path: str | None) -> None:
    """Point `jax_module`'s persistent cache at `path` (no-op for None)."""
    if path is None:
        return
    jax_module.config.update("jax_compilation_cache_dir", path)
    # Cache every compile, not only slow ones: the chunk and update functions are all reused.
    jax_module.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax_module.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def thread_note(threads: int) -> str:
    """How many threads XLA really uses, in words, for the run's metrics."""
    if int(threads) == 1:
        return "1 (XLA single-thread flags)"
    return f"XLA pool over {len(os.sched_getaffinity(0))} schedulable CPUs (asked {threads})"


def predict_padded(logits_of, x: np.ndarray, eval_rows: int, num_classes: int) -> np.ndarray:
    """Logits of `x` from the jitted `logits_of(rows)`, called with a few fixed shapes only: full
    chunks of `eval_rows`, a smaller input padded with zero rows to a power of 2."""
    x = np.asarray(x, dtype=np.float32)
    rows = min(eval_rows, 1 << max(len(x) - 1, 0).bit_length())
    out = [np.zeros((0, num_classes), dtype=np.float32)]
    for i in range(0, len(x), rows):
        part = x[i : i + rows]
        pad = np.zeros((rows - len(part), *x.shape[1:]), dtype=np.float32)
        out.append(np.asarray(logits_of(np.concatenate([part, pad])))[: len(part)])
    return np.concatenate(out).astype(np.float32)


def device_name(device) -> str:
    """A jax Device as base.Adapter.device() names it: "cpu" or "cuda:NVIDIA H200"."""
    return f"cuda:{device.device_kind}" if device.platform in ("gpu", "cuda") else "cpu"


# jax.config option that splits a CPU host into N XLA devices before JAX starts (the XLA flag
# --xla_force_host_platform_device_count does the same but is lost behind the single-thread
# flags above: XLA stops reading XLA_FLAGS at their non-flag token).
HOST_DEVICES_OPTION = "jax_num_cpu_devices"


def device_mesh(jax_module, devices: int):
    """A one-axis ("d") Mesh over the first `devices` local devices; None for one device."""
    if devices == 1:
        return None
    seen = jax_module.local_devices()
    if len(seen) < devices:
        raise ValueError(
            f"training.devices={devices}, but JAX sees {len(seen)} device(s) "
            f"[{', '.join(device_name(d) for d in seen)}]; expected {devices} (a node's GPUs, "
            f"or a CPU split by jax.config {HOST_DEVICES_OPTION}={devices} before JAX starts)"
        )
    return jax_module.sharding.Mesh(np.array(seen[:devices]), ("d",))


class JaxDevice:
    """base.Adapter's device hooks for an adapter on JAX (whichever release its venv has;
    imported lazily, so this module stays framework-free). The adapter says, by
    `_device_state()`, what its last update wrote."""

    framework = "JAX"

    def _configure(self, runtime) -> None:
        # Read when XLA's client starts, i.e. before the first computation of the process.
        configure_threads(self.threads)
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU
        if runtime.deterministic:
            flags = os.environ.get("XLA_FLAGS", "").split()
            if DETERMINISTIC_FLAG not in flags:
                os.environ["XLA_FLAGS"] = joined([*flags, DETERMINISTIC_FLAG])
        import jax

        # JAX's GPU default for float32 matmuls and convolutions is TF32: say it either way.
        precision = "tensorfloat32" if runtime.precision == "tf32" else "float32"
        jax.config.update("jax_default_matmul_precision", precision)
        # On a CPU, N host devices (GPUs are devices of their own); set once per process.
        if runtime.devices > 1 and getattr(jax.config, HOST_DEVICES_OPTION) < runtime.devices:
            jax.config.update(HOST_DEVICES_OPTION, runtime.devices)

    def _visible_devices(self) -> list[str]:
        import jax

        return [device_name(d) for d in jax.devices()]

    def device(self) -> str:
        import jax

        return device_name(jax.devices()[0])

    def synchronize(self) -> None:
        import jax

        jax.block_until_ready(self._device_state())

    def peak_memory_bytes(self) -> int | None:
        """Peak device memory in bytes; None where the device does not track it (CPU)."""
        import jax

        try:
            stats = jax.devices()[0].memory_stats()  # None on CPU
        except (AttributeError, NotImplementedError, RuntimeError):
            return None
        return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


# -- convolution as patches x kernel ---------------------------------------------------------
CONV_IMPLS = ("auto", "xla", "patches")


def conv_impls(option: str, platform: str, backend: str) -> tuple[str, str]:
    """The `conv` option resolved to (DP step's, everything else's) convolution.

    "auto": patches for the DP step on CPU, where vmap makes XLA's convolution slow, and XLA's
    own convolution for the rest (non-private steps, prediction) and on other platforms.
    """
    if option not in CONV_IMPLS:
        raise ValueError(
            f"{backend} option conv={option!r}; expected one of {', '.join(CONV_IMPLS)}"
        )
    if option == "auto":
        return ("patches" if platform == "cpu" else "xla"), "xla"
    return option, option


def conv_patches(jnp, x, w_hwio, stride: int, pad: int, layout: str):
    """Convolution (symmetric zero padding, no bias) as kh*kw shifted slices times the kernel.

    The same sum as lax.conv_general_dilated, written so that its per-example gradient under
    vmap is a batched matmul: XLA's CPU backend turns a vmapped convolution's filter gradient
    into a batch-grouped convolution, several times slower than this (docs/benchmarks.md).
    `layout` is "NHWC" or "NCHW" for x and the result; `jnp` is the caller's jax.numpy.
    """
    kh, kw, cin, cout = w_hwio.shape
    patches = shifted_patches(jnp, x, kh, kw, stride, pad, layout)
    kernel = w_hwio.reshape(kh * kw, cin, cout)
    if layout == "NHWC":
        return jnp.einsum("nkhwc,kco->nhwo", patches, kernel)
    return jnp.einsum("nkchw,kco->nohw", patches, kernel)


def shifted_patches(jnp, x, kh: int, kw: int, stride: int, pad: int, layout: str):
    """The kh*kw shifted, strided slices of the zero-padded x that a kh x kw convolution
    multiplies by its kernel: (n, kh*kw, ...x's other axes at the output's size)."""
    h_axis = layout.index("H")
    spatial = [(0, 0)] * 4
    spatial[h_axis] = spatial[h_axis + 1] = (pad, pad)
    xp = jnp.pad(x, spatial) if pad else x
    h_out = (x.shape[h_axis] + 2 * pad - kh) // stride + 1
    w_out = (x.shape[h_axis + 1] + 2 * pad - kw) // stride + 1
    shifts = []
    for a in range(kh):
        for b in range(kw):
            index = [slice(None)] * 4
            index[h_axis] = slice(a, a + stride * (h_out - 1) + 1, stride)
            index[h_axis + 1] = slice(b, b + stride * (w_out - 1) + 1, stride)
            shifts.append(xp[tuple(index)])
    return jnp.stack(shifts, axis=1)
