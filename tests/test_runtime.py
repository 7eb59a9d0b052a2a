"""CPU inference runtimes: OpenVINO gives the torch features, in order, and fails cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from niteru import embed
from niteru.errors import BadImageError, ConfigError
from niteru.runtime import openvino_available, resolve_runtime, threaded_batches

pytestmark = pytest.mark.skipif(not openvino_available(), reason="openvino/onnx not installed")


@pytest.fixture(scope="module")
def pair() -> tuple[embed.Embedder, embed.Embedder]:
    return embed.build_embedder(device="cpu"), embed.build_embedder(device="cpu", runtime="torch")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], np.ndarray]:
    """11 JPEGs of different sizes (one with EXIF orientation 6) and one crop box each (some whole, some not)."""
    folder = tmp_path_factory.mktemp("rt")
    rng = np.random.default_rng(7)
    paths, boxes = [], []
    for i in range(11):
        w, h = int(rng.integers(150, 500)), int(rng.integers(150, 500))
        img = np.full((h, w, 3), 245, np.uint8)
        img[h // 4: 3 * h // 4, w // 5: 4 * w // 5] = rng.integers(0, 230, 3)
        img = np.clip(img + rng.integers(-12, 12, img.shape), 0, 255).astype(np.uint8)
        exif = Image.Exif()
        if i == 3:
            exif[0x0112] = 6
        path = folder / f"{i:02d}.jpg"
        Image.fromarray(img).save(path, quality=90, exif=exif.tobytes())
        full_w, full_h = (h, w) if i == 3 else (w, h)
        box = (0.0, 0.0, float(full_w), float(full_h)) if i % 2 else (10.0, 12.0, full_w * 0.7, full_h * 0.8)
        paths.append(str(path))
        boxes.append(box)
    return paths, np.array(boxes)


def test_resolve_runtime() -> None:
    assert resolve_runtime("auto", "cpu") == "openvino"
    assert resolve_runtime("auto", "cuda:0") == "torch"  # CUDA always runs on torch
    assert resolve_runtime("torch", "cpu") == "torch"
    with pytest.raises(ConfigError, match="CPU only"):
        resolve_runtime("openvino", "cuda")
    with pytest.raises(ConfigError, match="unknown runtime 'tensorrt'"):
        resolve_runtime("tensorrt", "cpu")
    with pytest.raises(ConfigError, match="runtime"):
        embed.EmbedConfig.from_params({"runtime": "onnx"})


def test_openvino_features_equal_torch_in_order(pair: tuple[embed.Embedder, embed.Embedder],
                                                photos: tuple[list[str], np.ndarray]) -> None:
    fast, eager = pair
    assert (fast.runtime, eager.runtime) == ("openvino", "torch")
    assert fast.feature_model_id == eager.feature_model_id  # one feature store for both runtimes
    paths, boxes = photos
    ref = np.concatenate([f for _, f in eager.iter_features(paths, boxes, 4, 0, progress=False)])
    slices, chunks = zip(*fast.iter_features(paths, boxes, 3, 2, progress=False))  # 4 batches, 2 decode threads
    got = np.concatenate(chunks)
    assert [(s.start, s.stop) for s in slices] == [(0, 3), (3, 6), (6, 9), (9, 11)]
    assert got.shape == ref.shape == (11, 1280) and got.dtype == np.float32
    assert np.abs(got - ref).max() < 1e-4
    cosine = (embed.l2_normalize(got) * embed.l2_normalize(ref)).sum(axis=1)
    assert cosine.min() > 0.99999
    # a query photo (service path: synchronous forward) and the batch path give the same vector
    np.testing.assert_allclose(fast.embed([Image.open(paths[1]).convert("RGB")]), embed.l2_normalize(ref[1:2]),
                               atol=1e-5)
    assert "openvino_telemetry" not in sys.modules  # OpenVINO's usage telemetry was never loaded


def test_openvino_is_imported_without_its_usage_telemetry(tmp_path: Path) -> None:
    """A plain ``import openvino`` records and sends an event (consent by default); through niteru it does not."""
    code = ("import sys; from niteru.runtime import import_openvino; ov = import_openvino(); "
            "print(ov.Core().available_devices, 'openvino_telemetry' in sys.modules, "
            "type(sys.modules['openvino.tools.ovc.telemetry_utils'].tm).__name__ if "
            "'openvino.tools.ovc.telemetry_utils' in sys.modules else 'not-loaded')")
    env = {**os.environ, "HOME": str(tmp_path), "CI": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "['CPU'] False" in out.stdout, out.stdout
    assert not (tmp_path / "intel").exists()  # no telemetry client id / usage stats written to HOME


def test_concurrent_calls_and_abandoned_streams(pair: tuple[embed.Embedder, embed.Embedder],
                                                photos: tuple[list[str], np.ndarray]) -> None:
    fast, _ = pair
    net = fast.openvino_network()
    rng = np.random.default_rng(0)
    # 1-3 images per call: single images take one request, larger batches are split over every stream
    batches = [rng.integers(0, 256, (1 + i % 3, 3, 224, 224), dtype=np.uint8) for i in range(6)]
    expected = [np.concatenate(list(net.map([b[j:j + 1] for j in range(len(b))]))) for b in batches]
    results: dict[int, np.ndarray] = {}

    def worker(i: int) -> None:
        results[i] = net(batches[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):
        np.testing.assert_array_equal(results[i], expected[i])
    # a consumer that stops early gives every infer request back to the pool
    paths, boxes = photos
    stream = fast.iter_features(paths, boxes, 2, 2, progress=False)
    next(stream)
    stream.close()
    assert net._pool.qsize() == net.n_requests
    with pytest.raises(ValueError, match="uint8"):
        net(np.zeros((1, 3, 224, 224), np.float32))


def test_a_bad_image_fails_with_its_name(pair: tuple[embed.Embedder, embed.Embedder],
                                         photos: tuple[list[str], np.ndarray], tmp_path: Path) -> None:
    fast, _ = pair
    paths, boxes = photos
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(paths[0]).read_bytes()[:200])
    with pytest.raises(BadImageError, match="broken.jpg"):
        list(fast.iter_features([*paths[:5], str(broken), *paths[5:]], np.vstack([boxes[:5], boxes[:1], boxes[5:]]),
                                2, 2, progress=False))
    assert fast.openvino_network()._pool.qsize() == fast.openvino_network().n_requests


def test_threaded_batches_keeps_order_and_bounds_work() -> None:
    started: list[int] = []
    torch_threads: set[int] = set()
    lock = threading.Lock()
    caller_threads = torch.get_num_threads()

    def load(i: int) -> np.ndarray:
        with lock:
            started.append(i)
            torch_threads.add(torch.get_num_threads())
        return np.full((2,), i)

    stream = threaded_batches(load, 100, 10, threads=3, prefetch=2)
    first = next(stream)
    assert first.tolist() == [[i, i] for i in range(10)]
    assert len(started) <= 40  # only the prefetched batches (+ the one being consumed) were decoded
    rest = np.concatenate(list(stream))
    assert rest[:, 0].tolist() == list(range(10, 100))
    assert torch_threads == {1}  # decode threads run torch ops single-threaded ...
    assert torch.get_num_threads() == caller_threads  # ... without changing the caller's setting
