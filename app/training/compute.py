"""Where a process computes (`accelerator`: the torch device; "device" in this project is always a federated
participant) and whether it must do so reproducibly (`deterministic`).

`accelerator` is resolved in each process that trains or aggregates (a simulation actor, a SuperNode, the server), so
`auto` means "this process's CUDA device when it sees one": the clients of a deployment may run on CPUs while its
server aggregates on a GPU. Inside a Ray actor given a GPU share (`client_num_gpus`), Ray makes the assigned GPU the
actor's `cuda:0`.

`deterministic` asks torch and cuBLAS for run-to-run reproducible kernels (same seed, same device, same numbers):
the cuBLAS workspace configuration that makes its GEMMs deterministic, and `torch.use_deterministic_algorithms`,
which raises on any operation that has no deterministic implementation instead of running it silently.
"""

from __future__ import annotations

import os
import re

import torch

ACCELERATOR_CHOICES = "auto (CUDA when this process sees it, else cpu), cpu, cuda or cuda:N"
_ACCELERATOR = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
CUBLAS_WORKSPACE = ":4096:8"  # the setting cuBLAS documents for deterministic results


def accelerator_problem(value: object) -> str | None:
    """Why `value` cannot be this process's `accelerator` (None when it can)."""
    if not isinstance(value, str) or not _ACCELERATOR.match(value):
        return f"one of {ACCELERATOR_CHOICES}"
    if value.startswith("cuda"):
        if not torch.cuda.is_available():
            return (
                f"cpu or auto: this process sees no CUDA device (torch {torch.__version__}, "
                f"torch.cuda.is_available() is False)"
            )
        index = int(value.split(":")[1]) if ":" in value else 0
        if index >= torch.cuda.device_count():
            return (
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1} (this process sees "
                f"{torch.cuda.device_count()} CUDA devices), cpu or auto"
            )
    return None


def resolve_accelerator(value: str) -> torch.device:
    """The torch device named by `accelerator` in this process; `auto` is cuda when this process sees CUDA, else cpu.
    Checked here too: a simulation actor or a SuperNode may see other devices than the process that validated."""
    problem = accelerator_problem(value)
    if problem is not None:
        raise ValueError(f"config key 'accelerator' = {value!r} cannot be used in this process; allowed: {problem}")
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(value)


def set_deterministic(on: bool) -> None:
    """Make this process's torch (and, before its first GEMM, cuBLAS) reproducible run to run, or release it."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(on)
