"""Training throughput: samples/s over the training steps only, the peak GPU memory and the model FLOPs
utilisation (MFU) against the device's peak (`PEAK_TFLOPS`, or `train.peak_tflops`). The engine reports
them at checkpoints (run.json, MLflow, the CLI's last line)."""

from __future__ import annotations

import logging
import time

import torch

__all__ = ["PEAK_TFLOPS", "THROUGHPUT_METRICS", "Throughput", "peak_flops"]

log = logging.getLogger(__name__)

# Dense peak TFLOP/s per GPU (bfloat16 tensor cores, float32 without TF32) from the vendors' data sheets,
# matched against torch.cuda.get_device_name; Settings.peak_tflops overrides it (an unlisted GPU).
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 67.0), "H100 PCIe": (756.0, 51.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6), "L4": (121.0, 30.3), "A10G": (70.0, 31.2), "A10": (125.0, 31.2),
}


THROUGHPUT_METRICS = ("samples_per_s", "peak_gpu_memory_gib", "mfu")  # in run.json, MLflow, the CLI's last line


def peak_flops(device: torch.device, bf16: bool, override_tflops: float = 0.0) -> float | None:
    """The device's peak FLOP/s for the MFU (None on a CPU or an unlisted GPU without an override)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, single) in PEAK_TFLOPS.items():  # the more specific names come first
        if key in name:
            return (half if bf16 else single) * 1e12
    log.info("no peak FLOP/s known for %s: MFU not reported (set train.peak_tflops)", name)
    return None


class Throughput:
    """Training samples/s over the training steps only (validation and checkpoints paused out), the peak
    GPU memory and the MFU. It synchronises the device only where it pauses or reports (checkpoints)."""

    def __init__(self, device: torch.device, batch_size: int, world: int, *, flops: float | None,
                 peak_flops: float | None, start_step: int) -> None:
        self.device, self.batch_size, self.world = device, batch_size, world
        self.flops, self.peak = flops, peak_flops
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.restart(start_step)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def restart(self, step: int) -> None:
        self.t0, self.from_step, self.paused, self.paused_at = self._now(), step, 0.0, None

    def pause(self) -> None:
        self.paused_at = self._now()

    def resume(self) -> None:
        if self.paused_at is not None:
            self.paused += time.perf_counter() - self.paused_at
            self.paused_at = None

    def elapsed(self) -> float:
        """Training seconds since the (re)start, without the pauses."""
        now = self.paused_at if self.paused_at is not None else time.perf_counter()
        return now - self.t0 - self.paused

    def report(self, step: int) -> dict[str, float]:
        """{samples_per_s (global), peak_gpu_memory_gib (CUDA), mfu (when the FLOPs and peak are known)}."""
        seconds = self.elapsed()
        rate = (step - self.from_step) * self.batch_size / seconds if step > self.from_step and seconds > 0 else 0.0
        out = {"samples_per_s": rate}
        if self.device.type == "cuda":
            out["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.flops and self.peak:
            out["mfu"] = rate * self.flops / (self.peak * self.world)
        return out
