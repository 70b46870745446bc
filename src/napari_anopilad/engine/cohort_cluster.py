"""The local dask.distributed cluster of a cohort run: one worker process per GPU, or a few on the CPU."""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

# CPU workers: enough processes to overlap slide reading with scoring, few enough that each torch
# process still gets several cores for its own threads.
MAX_CPU_WORKERS = 4


def visible_gpus() -> list[str]:
    """Return the ids of the CUDA GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them.

    When ``CUDA_VISIBLE_DEVICES`` is set its entries are returned as given (indices or UUIDs), so each
    worker can be pinned to one of them; otherwise the indices ``0 .. n-1`` of the GPUs torch finds.
    """
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [entry.strip() for entry in listed.split(",") if entry.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def worker_environments(
    device: str, gpus: list[str], n_workers: int | None, cpu_count: int
) -> list[dict[str, str]]:
    """Return the environment variables of each local worker process.

    Parameters
    ----------
    device : str
        The device request: ``auto`` (GPUs when there are any), ``cuda`` or ``cpu``.
    gpus : list of str
        Visible GPU ids (:func:`visible_gpus`).
    n_workers : int or None
        Worker processes; by default one per GPU, or on the CPU ``min(4, cpu_count // 2)`` (at least 1).
    cpu_count : int
        CPU cores of the machine.

    Returns
    -------
    list of dict
        One dict per worker. GPU workers get ``CUDA_VISIBLE_DEVICES`` set to one GPU each (round robin when
        there are more workers than GPUs), so each uses its GPU as ``cuda:0``. CPU workers get no GPU and
        ``OMP_NUM_THREADS`` set to their share of the cores (dask's nanny sets 1 by default).

    Raises
    ------
    ValueError
        For ``cuda`` without GPUs, ``cuda:N`` (pin GPUs with ``CUDA_VISIBLE_DEVICES`` instead), another
        device, or fewer than one worker.
    """
    request = device.strip().lower()
    if request.startswith("cuda:"):
        raise ValueError(
            f"device {device!r} is invalid for a cohort's local cluster, which gives each worker one GPU: "
            "use --device cuda and choose the GPUs with CUDA_VISIBLE_DEVICES (for example 0,2)"
        )
    if request not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device {device!r} is invalid: use auto, cpu or cuda")
    if request == "cuda" and not gpus:
        raise ValueError(
            "device 'cuda' is not available: no CUDA GPU is visible (check the driver and "
            "CUDA_VISIBLE_DEVICES), or use --device cpu"
        )
    if n_workers is not None and n_workers < 1:
        raise ValueError(f"--n-workers {n_workers} is invalid: use 1 or more")

    if request != "cpu" and gpus:
        # NOTE: tests check these environments, but the GPU workers themselves have not run on a GPU machine yet.
        count = n_workers if n_workers is not None else len(gpus)
        return [{"CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]} for index in range(count)]

    count = n_workers if n_workers is not None else max(1, min(MAX_CPU_WORKERS, cpu_count // 2))
    threads = str(max(1, cpu_count // count))
    return [
        {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        for _ in range(count)
    ]


def start_local_cluster(
    environments: list[dict[str, str]], dashboard_address: str | None = ":8787", timeout_s: float = 600.0
) -> tuple[Any, Any]:
    """Start a ``distributed.LocalCluster`` of one single-threaded worker process per environment.

    Parameters
    ----------
    environments : list of dict
        Environment variables of each worker (:func:`worker_environments`).
    dashboard_address : str or None
        Where the dashboard listens (``":8787"``; dask takes a free port when that one is busy); None for none.
    timeout_s : float
        Seconds to wait for every worker to start.

    Returns
    -------
    (LocalCluster, Client)
        Close the client, then the cluster, when done.
    """
    from distributed import Client, LocalCluster
    from distributed.system import MEMORY_LIMIT

    cluster = LocalCluster(
        n_workers=0,
        threads_per_worker=1,
        processes=True,
        dashboard_address=dashboard_address,
        memory_limit=MEMORY_LIMIT // len(environments),
    )
    try:
        # LocalCluster gives every worker the same options; a worker spec per GPU adds its own environment.
        template = cluster.new_spec
        for index, environment in enumerate(environments):
            options = dict(template["options"], env=environment)
            cluster.worker_spec[index] = {"cls": template["cls"], "options": options}
        cluster.scale(len(environments))
        client = Client(cluster)
        client.wait_for_workers(len(environments), timeout=timeout_s)
    except BaseException:
        cluster.close()
        raise
    logger.info("Started a local cluster of %d workers: %s", len(environments), environments)
    return cluster, client
