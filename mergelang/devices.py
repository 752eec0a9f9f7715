"""Which devices a merge runs on: `cpu`, `cuda`, `cuda:N`, `cuda:0,cuda:1` or `cuda:all`.

Checked before any work is done, so a missing GPU is a diagnostic, not a failure in the
middle of a merge. Several GPUs split the output tensors between them.
"""

from __future__ import annotations

import torch

from .diagnostics import error


def parse_devices(spec: str) -> list[torch.device]:
    """The devices named by `spec`; raises MergeError if torch cannot use one here."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec.strip() == "cuda:all":
        if count == 0:
            raise _no_gpu(spec)
        return [torch.device("cuda", i) for i in range(count)]
    devices = [_one(part.strip(), count) for part in spec.split(",")]
    if len(set(devices)) != len(devices):
        raise error(f'device "{spec}" names a device twice', None)
    if len(devices) > 1 and any(d.type != "cuda" for d in devices):
        raise error(f'device "{spec}": only GPUs can be combined', None,
                    hint="e.g. --device cuda:0,cuda:1 or cuda:all")
    return devices


def _one(name: str, count: int) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise error(f'unknown device "{name}"', None,
                    hint="use cpu, cuda, cuda:N, cuda:0,cuda:1 or cuda:all")
    if device.type == "cuda":
        if count == 0:
            raise _no_gpu(name)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= count:
            raise error(f'device "{name}" does not exist: there '
                        f"{'is 1 CUDA GPU' if count == 1 else f'are {count} CUDA GPUs'}",
                        None, hint=f"use cuda:0 to cuda:{count - 1}")
    return device


def _no_gpu(name: str):
    return error(f'device "{name}" is not available: torch finds no CUDA GPU here', None,
                 hint="use --device cpu")
