"""What the machine has, for the memory check (:mod:`pipeline.training.budget`) and the sweep's choice of
workers: the host memory this process may still allocate (MemAvailable, a cgroup v2 limit), whether
Lightning will train on CUDA, and the GPU's free memory; and whether a real-data task's file is readable.
Light imports only (stdlib + pipeline.config): torch is imported only where a GPU driver is present and
the accelerator could resolve to it (scikit-learn only for digits).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.config import Config


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """cgroup v2 ``memory.max - memory.current`` (a container's limit), None without a limit."""
    try:
        root = Path("/sys/fs/cgroup")
        rel = next(
            (
                ln.split("::", 1)[1]
                for ln in Path("/proc/self/cgroup").read_text().splitlines()
                if ln.startswith("0::")
            ),
            "/",
        )
        d = root / rel.lstrip("/")
        limit = (d / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((d / "memory.current").read_text()))
    except (OSError, ValueError, StopIteration):
        return None


def host_available() -> tuple[int, str]:
    """Bytes this process may still allocate on the host, and where the number came from."""
    avail, src = _meminfo_available(), "MemAvailable"
    if avail is None:
        try:
            import psutil

            avail, src = int(psutil.virtual_memory().available), "psutil"
        except ImportError:
            avail, src = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "sysconf"
    cg = _cgroup_available()
    if cg is not None and cg < avail:
        return cg, "cgroup memory.max"
    return avail, src


# Where a CUDA (or ROCm) driver shows itself on Linux. With none of these torch.cuda sees no device, and a
# sweep's parent need not import torch (seconds of CPU on the path to the first trial: python -X importtime
# -c 'import torch') to know.
GPU_DRIVER_PATHS = ("/proc/driver/nvidia/version", "/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def gpu_driver_absent() -> bool:
    """True when torch can see no GPU, known without importing it: CUDA_VISIBLE_DEVICES hides every
    device, or (Linux) no GPU driver is present (:data:`GPU_DRIVER_PATHS`)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return True
    return sys.platform.startswith("linux") and not any(os.path.exists(p) for p in GPU_DRIVER_PATHS)


def uses_cuda(cfg: Config) -> bool:
    """Whether Lightning will train on CUDA: accelerator gpu/cuda (or auto) with a visible GPU.

    ``gpu`` on a machine without one is not refused here: inside a suite Lightning refuses it at the
    start of the entry's run and the run is recorded FAILED (README, "Regression suites": an error row);
    the ``train`` and ``sweep`` commands refuse it first (:func:`check_accelerator`).
    """
    if cfg.trainer.accelerator == "cpu" or gpu_driver_absent():
        return False
    import torch

    return bool(torch.cuda.is_available())


def device_available() -> int:
    import torch

    free, _ = torch.cuda.mem_get_info()
    return int(free)


def check_data(cfg: Config, key: str = "task.name") -> None:
    """The data a real-data task reads is on this machine and readable (digits: scikit-learn's bundled
    file), or one line naming ``key`` and the file, before any store is opened. The synthetic tasks read
    none; scikit-learn is imported for digits only."""
    if cfg.task.name == "digits":
        from pipeline.training.digits import check_readable

        check_readable(key)


def check_accelerator(cfg: Config, key: str = "trainer.accelerator", remedy: str = "use auto or cpu") -> None:
    """Refuse ``gpu`` / ``cuda`` where torch sees no CUDA device, in one line naming ``key``, before any
    store is opened: Lightning's own refusal came as a traceback after the run was created, which it left
    FAILED with nothing to resume."""
    if cfg.trainer.accelerator not in ("gpu", "cuda"):
        return
    if not gpu_driver_absent():
        import torch

        if torch.cuda.is_available():
            return
    from pipeline.schema import ConfigError

    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1")
    why = "CUDA_VISIBLE_DEVICES hides every device" if hidden else "torch sees no CUDA device on this machine"
    raise ConfigError(key, f"{cfg.trainer.accelerator!r}, but {why}; {remedy}")
