"""CPU inference runtimes for the embedder: PyTorch eager or OpenVINO.

On CPU the same network (backbone + head, batch norms folded) runs 3-4x faster through OpenVINO than in eager
PyTorch on the machines we measured (``benchmarks/bench_embed.py``): its CPU plugin fuses the depthwise/pointwise
blocks and runs several inference streams in parallel. The network is exported once to ONNX (TorchScript exporter,
opset 17, dynamic batch, uint8 input with the mean/std normalisation inside the graph) and compiled by the OpenVINO
runtime with ``INFERENCE_PRECISION_HINT=f32``: the features are the PyTorch ones up to float rounding
(max abs difference ~1e-6, tested), so both runtimes share one feature-model id and one feature store.

The ONNX file goes through ``openvino.Core.read_model`` (the C++ runtime), not ``openvino.convert_model``.
OpenVINO's Python package sends usage telemetry (an event on ``import openvino``, more from the converter) unless
the user opted out; nothing in niteru may reach the network, so :func:`import_openvino` imports it with the
``openvino_telemetry`` module blocked, which makes OpenVINO fall back to its built-in no-op stub (process-local:
no consent file is written). CUDA always runs on PyTorch (bf16 autocast, nvjpeg).
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import os
import queue
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from niteru.errors import ConfigError

log = logging.getLogger(__name__)

Runtime = Literal["auto", "torch", "openvino"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)
ONNX_OPSET = 17


def import_openvino() -> Any:
    """``import openvino`` with its usage telemetry disabled (see the module docstring)."""
    import sys

    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    blocked = "openvino_telemetry" not in sys.modules
    if blocked:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # import -> ImportError -> stub
    try:
        import openvino
    finally:
        if blocked and sys.modules.get("openvino_telemetry", 0) is None:
            del sys.modules["openvino_telemetry"]
    return openvino


def openvino_available() -> bool:
    """True when both ``openvino`` and ``onnx`` (needed by the exporter) are importable."""
    return all(importlib.util.find_spec(name) is not None for name in ("openvino", "onnx"))


def resolve_runtime(runtime: str, device: str) -> str:
    """``auto`` -> ``openvino`` on CPU when installed, else ``torch``; explicit choices are validated."""
    runtime = (runtime or "auto").strip().lower()
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}: use one of {RUNTIMES}")
    cuda = str(device).startswith("cuda")
    if runtime == "openvino":
        if cuda:
            raise ConfigError(f"runtime='openvino' runs on CPU only but device={device!r}; use runtime='auto' or "
                              f"'torch' on CUDA")
        if not openvino_available():
            raise ConfigError("runtime='openvino' needs the openvino and onnx packages (pinned in requirements.txt); "
                              "install them or use runtime='torch'")
        return "openvino"
    if runtime == "auto":
        return "openvino" if not cuda and openvino_available() else "torch"
    return "torch"


class _Normalised(torch.nn.Module):
    """uint8 NCHW pixels -> features: the mean/std normalisation becomes part of the exported graph."""

    def __init__(self, network: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.network = network
        self.register_buffer("mean", mean.detach().cpu().float().view(1, 3, 1, 1))
        self.register_buffer("std", std.detach().cpu().float().view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network((pixels.float() - self.mean) / self.std)


def export_onnx(network: torch.nn.Module, input_size: int, mean: torch.Tensor, std: torch.Tensor,
                path: Path) -> Path:
    """Write ``network`` (eval mode, on CPU) as ONNX with a dynamic batch: uint8 ``pixels`` -> ``features``."""
    import copy

    wrapped = _Normalised(copy.deepcopy(network).cpu().to(memory_format=torch.contiguous_format).eval(), mean, std)
    example = torch.zeros(2, 3, input_size, input_size, dtype=torch.uint8)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape arithmetic (static here)
        torch.onnx.export(wrapped, (example,), str(path), input_names=["pixels"], output_names=["features"],
                          dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
                          opset_version=ONNX_OPSET, dynamo=False)
    return path


class OpenVinoNetwork:
    """A torch network compiled for the OpenVINO CPU plugin (throughput mode, f32), with a pool of infer requests.

    ``__call__`` runs one batch synchronously, split across the inference streams when it holds several images;
    :meth:`map` streams batches through all requests asynchronously and yields results in input order. Both are
    thread-safe: requests are borrowed from a pool, and callers that need all of them take them one caller at a
    time (no two callers can each hold part of the pool and wait for the rest).
    """

    def __init__(self, network: torch.nn.Module, input_size: int, mean: torch.Tensor, std: torch.Tensor):
        ov = import_openvino()

        with tempfile.TemporaryDirectory(prefix="niteru-onnx-") as tmp:
            onnx_path = export_onnx(network, input_size, mean, std, Path(tmp) / "network.onnx")
            core = ov.Core()
            model = core.read_model(str(onnx_path))
        self.compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT",
                                                          "INFERENCE_PRECISION_HINT": "f32"})
        self.n_requests = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        self._pool: queue.Queue[Any] = queue.Queue()
        self._gather = threading.Lock()
        for _ in range(self.n_requests):
            self._pool.put(self.compiled.create_infer_request())
        self.version = ov.get_version()
        log.info("OpenVINO %s CPU: %d stream(s), %d thread(s), %d infer request(s)", self.version, self.streams,
                 self.threads, self.n_requests)

    def _check(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch)
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a uint8 [B, 3, S, S] batch, got {batch.dtype} {batch.shape}")
        return batch

    def start(self, request: Any, batch: np.ndarray) -> None:
        """Submit ``batch`` to ``request`` (the one place pixels enter the compiled model)."""
        request.start_async({0: batch}, share_inputs=False)

    @staticmethod
    def collect(request: Any) -> np.ndarray:
        """Wait for ``request`` and copy its features out (the request's buffer is reused by the next batch)."""
        request.wait()
        return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = self._check(batch)
        parts = min(self.n_requests, len(batch))
        if parts > 1:  # one chunk per stream: a multi-image request uses every core
            return np.concatenate(list(self.map(np.array_split(batch, parts))))
        request = self._pool.get()
        try:
            self.start(request, batch)
            return self.collect(request)
        finally:
            self._pool.put(request)

    def map(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Features of every batch, in order, with up to ``n_requests`` batches in flight."""
        with self._gather:
            requests = [self._pool.get() for _ in range(self.n_requests)]
        in_flight: collections.deque[Any] = collections.deque()
        try:
            free = list(requests)
            for batch in batches:
                if not free:
                    done = in_flight.popleft()
                    yield self.collect(done)
                    free.append(done)
                request = free.pop()
                self.start(request, self._check(batch))
                in_flight.append(request)
            while in_flight:
                yield self.collect(in_flight.popleft())
        finally:
            for request in in_flight:
                request.wait()  # an abandoned generator must not leave requests running
            for request in requests:
                self._pool.put(request)


def threaded_batches(load: Callable[[int], np.ndarray], n: int, batch_size: int, threads: int, prefetch: int) -> Iterator[np.ndarray]:
    """Batches ``np.stack([load(i) for i in batch])`` built by ``threads`` threads, in order, ``prefetch`` ahead.

    PIL (decode) and torch (crop/resize) release the GIL, so threads overlap decoding with inference without
    copying pixels between processes. Each decode thread runs torch ops single-threaded (torch's OpenMP thread
    count is per calling thread): the parallelism is across images, and the cores are shared with inference.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    def build(start: int) -> np.ndarray:
        return np.stack([load(i) for i in range(start, min(start + batch_size, n))])

    starts = iter(range(0, n, batch_size))
    pending: collections.deque[Future[np.ndarray]] = collections.deque()
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="niteru-decode",
                            initializer=torch.set_num_threads, initargs=(1,)) as pool:
        try:
            for start in starts:
                pending.append(pool.submit(build, start))
                if len(pending) >= max(1, prefetch):
                    break
            while pending:
                batch = pending.popleft().result()
                nxt = next(starts, None)
                if nxt is not None:
                    pending.append(pool.submit(build, nxt))
                yield batch
        finally:
            for future in pending:
                future.cancel()


def decode_threads(num_workers: int, n_items: int, batch_size: int) -> int:
    """Decode threads for the OpenVINO path: -1 = auto (one per core, at least 1; none needed for one batch)."""
    if num_workers >= 0:
        return max(1, num_workers)
    return 1 if n_items <= batch_size else max(1, min(8, os.cpu_count() or 1))

