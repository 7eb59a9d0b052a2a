"""Embed stage: incremental feature store, sharding, model.json round trip, preprocessing twins."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from niteru import embed
from niteru.demo import ensure_demo_catalog
from niteru.embed import EmbedConfig
from niteru.errors import ConfigError
from niteru.features import FeatureStore, item_key
from niteru.images import load_rgb
from niteru.io import sha256_file, write_parquet_atomic
from niteru.runs import write_stage_summary

N_PRODUCTS, VARIANTS = 6, 2  # 12 photos; 3 of them get a second (detected) crop -> 15 items


def _make_upstream(run_dir: Path, demo: Path) -> pd.DataFrame:
    """extract/ and detect/ folders following the contracts in docs/architecture.md, over a private image copy."""
    images = run_dir.parent / f"{run_dir.name}-images"
    if not images.exists():
        shutil.copytree(demo / "images", images)
    catalog = pd.read_parquet(demo / "catalog.parquet")
    catalog["image_path"] = [str(images / Path(uri).name) for uri in catalog["image_uri"]]
    _refresh_fetch_columns(catalog)
    _write_stage(run_dir / "extract", "catalog.parquet", catalog)
    boxes = _boxes(catalog)
    _write_stage(run_dir / "detect", "boxes.parquet", boxes)
    return catalog


def _refresh_fetch_columns(catalog: pd.DataFrame) -> None:
    catalog["image_sha256"] = [sha256_file(p) for p in catalog["image_path"]]
    sizes = [Image.open(p).size for p in catalog["image_path"]]
    catalog["width"] = [w for w, _ in sizes]
    catalog["height"] = [h for _, h in sizes]
    catalog["fetch_status"] = "ok"


def _boxes(catalog: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for i, r in enumerate(catalog.itertuples()):
        rows.append((r.product_id, r.image_sha256, 0, 0.0, 0.0, float(r.width), float(r.height), 1.0, "whole", "whole"))
        if i % 4 == 0:  # a detected crop too
            rows.append((r.product_id, r.image_sha256, 1, 40.0, 30.5, 200.0, 220.0, 0.8, "object", "test"))
    cols = ["product_id", "image_sha256", "crop_index", "x0", "y0", "x1", "y1", "score", "label", "method"]
    return pd.DataFrame(rows, columns=cols)


def _write_stage(folder: Path, name: str, frame: pd.DataFrame) -> None:
    write_parquet_atomic(folder / name, frame)
    write_stage_summary(folder, counts={"rows": len(frame)})


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_catalog(tmp_path_factory.mktemp("demo"), n_products=N_PRODUCTS, variants=VARIANTS)


@pytest.fixture(scope="module")
def embedder() -> embed.Embedder:
    # the default: EfficientNet-Lite0 with the shipped ImageNet weights, on the default CPU runtime (OpenVINO)
    return embed.build_embedder(device="cpu")


@pytest.fixture(scope="module")
def torch_embedder() -> embed.Embedder:
    return embed.build_embedder(device="cpu", runtime="torch")


class ForwardCounter:
    """Counts images that really go through the model: a forward pre-hook on the torch network, or, on the
    OpenVINO runtime, every batch submitted to the compiled model's infer requests."""

    def __init__(self, embedder: embed.Embedder):
        self.calls = 0
        self.images = 0
        if embedder.runtime == "openvino":
            net = embedder.openvino_network()
            submit = net.start

            def counted(request: object, batch: np.ndarray) -> None:
                self._count(len(batch))
                submit(request, batch)

            net.start = counted
            self._close = lambda: delattr(net, "start")
        else:
            handle = embedder.network.register_forward_pre_hook(lambda _m, args: self._count(int(args[0].shape[0])))
            self._close = handle.remove

    def _count(self, n: int) -> None:
        self.calls += 1
        self.images += n

    def close(self) -> None:
        self._close()


def _cfg(run_dir: Path, cache: Path, **kw: object) -> EmbedConfig:
    return EmbedConfig(run_dir=str(run_dir), cache_dir=str(cache), device="cpu", batch_size=8, num_workers=0, **kw)


def _vectors(run_dir: Path) -> tuple[np.ndarray, pd.DataFrame]:
    return np.load(run_dir / "embed" / "vectors.npy"), pd.read_parquet(run_dir / "embed" / "items.parquet")


@pytest.mark.parametrize("runtime", ["openvino", "torch"])
def test_rerun_embeds_nothing_and_a_changed_image_only_that_one(tmp_path: Path, demo: Path, runtime: str,
                                                                 request: pytest.FixtureRequest) -> None:
    embedder = request.getfixturevalue("embedder" if runtime == "openvino" else "torch_embedder")
    assert embedder.runtime == runtime
    cache = tmp_path / "_cache"
    run1, run2, run3 = tmp_path / "r1", tmp_path / "r2", tmp_path / "r3"
    catalog = _make_upstream(run1, demo)
    n_items = len(pd.read_parquet(run1 / "detect" / "boxes.parquet"))
    assert n_items == 15

    counter = ForwardCounter(embedder)
    try:
        first = embed.run(_cfg(run1, cache), embedder=embedder, progress=False)
        assert (counter.images, first.counts["embedded"], first.counts["from_store"]) == (15, 15, 0)
        assert counter.calls == 2  # batches of 8

        # a rerun (next day's run, same images) embeds nothing and gives identical vectors
        shutil.copytree(run1 / "extract", run2 / "extract")
        shutil.copytree(run1 / "detect", run2 / "detect")
        counter.images = 0
        second = embed.run(_cfg(run2, cache), embedder=embedder, progress=False)
        assert counter.images == 0 and second.counts == {**first.counts, "embedded": 0, "from_store": 15}
        v1, items1 = _vectors(run1)
        v2, items2 = _vectors(run2)
        assert v1.tobytes() == v2.tobytes()
        pd.testing.assert_frame_equal(items1, items2)

        # one product photo changes: only its single crop is embedded again
        changed = catalog.loc[5, "image_path"]
        Image.open(changed).transpose(Image.Transpose.FLIP_LEFT_RIGHT).rotate(20, fillcolor="white").save(changed)
        _refresh_fetch_columns(catalog)
        _write_stage(run3 / "extract", "catalog.parquet", catalog)
        _write_stage(run3 / "detect", "boxes.parquet", _boxes(catalog))
        counter.images = 0
        third = embed.run(_cfg(run3, cache), embedder=embedder, progress=False)
        assert counter.images == 1 and (third.counts["embedded"], third.counts["from_store"]) == (1, 14)
    finally:
        counter.close()
    v3, items3 = _vectors(run3)
    row = int(np.flatnonzero(items3["product_id"] == catalog.loc[5, "product_id"])[0])
    unchanged = np.arange(len(v3)) != row
    np.testing.assert_array_equal(v3[unchanged], v1[unchanged])
    assert float(v3[row] @ v1[row]) < 0.99  # the new photo really got a new vector
    assert len(FeatureStore.under(cache, embedder.feature_model_id, embedder.feature_dim)) == 16


def test_vectors_contract_and_model_json_rebuilds_the_embedder(tmp_path: Path, demo: Path,
                                                               embedder: embed.Embedder) -> None:
    run = tmp_path / "run"
    catalog = _make_upstream(run, demo)
    result = embed.run(_cfg(run, tmp_path / "_cache", pca_dim=8), embedder=embedder, progress=False)
    vectors, items = _vectors(run)
    assert vectors.dtype == np.float32 and vectors.shape == (15, 8) and result.dim == 8
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert list(items.columns) == embed.ITEM_COLUMNS
    assert items[["product_id", "crop_index"]].apply(tuple, axis=1).is_monotonic_increasing
    assert 0.5 < result.metrics["pca_explained_variance"] <= 1.0

    rebuilt = embed.load_embedder(run / "embed" / "model.json")
    assert rebuilt.model_id == result.model_id and rebuilt.dim == 8
    whole = items.index[items["crop_index"] == 0][:4]
    photos = [load_rgb(catalog.set_index("product_id").loc[pid, "image_path"]) for pid in items.loc[whole, "product_id"]]
    np.testing.assert_allclose(rebuilt.embed(photos), vectors[whole], atol=1e-4)

    config, state = rebuilt.export()
    assert all(isinstance(t, torch.Tensor) for t in state.values()) and "projection.components" in state
    clone = embed.Embedder.from_export(config, state)
    assert clone.model_id == rebuilt.model_id
    np.testing.assert_allclose(clone.embed(photos), vectors[whole], atol=1e-4)


def test_shards_merge_to_the_unsharded_result(tmp_path: Path, demo: Path, embedder: embed.Embedder) -> None:
    full, sharded, fresh = tmp_path / "full", tmp_path / "sharded", tmp_path / "fresh"
    for run in (full, sharded, fresh):
        _make_upstream(run, demo)
    embed.run(_cfg(full, tmp_path / "c1", pca_dim=6), embedder=embedder, progress=False)
    with pytest.raises(ConfigError, match="missing or incomplete"):
        embed.merge_shards(_cfg(sharded, tmp_path / "c1", pca_dim=6, num_shards=3))
    sizes = []
    for i in range(3):  # same cache: shards reuse the stored features
        res = embed.run(_cfg(sharded, tmp_path / "c1", pca_dim=6, shard_index=i, num_shards=3), embedder=embedder,
                        progress=False)
        sizes.append(res.n_items)
    assert sum(sizes) == 15 and all(0 < s < 15 for s in sizes)
    merged = embed.merge_shards(_cfg(sharded, tmp_path / "c1", pca_dim=6, num_shards=3))
    assert merged.counts["items"] == 15
    for name in ("vectors.npy", "items.parquet", "model.json", "projection.npz"):
        assert sha256_file(full / "embed" / name) == sha256_file(sharded / "embed" / name), name

    for i in range(2):  # a fresh cache: each shard computes its own features
        embed.run(_cfg(fresh, tmp_path / "c2", shard_index=i, num_shards=2), embedder=embedder, progress=False)
    merged = embed.merge_shards(_cfg(fresh, tmp_path / "c2", num_shards=2))
    assert merged.counts["embedded"] == 15
    embed.run(_cfg(full, tmp_path / "c1"), embedder=embedder, progress=False)  # no PCA, for comparison
    v_full, items_full = _vectors(full)
    v_fresh, items_fresh = _vectors(fresh)
    pd.testing.assert_frame_equal(items_full, items_fresh)
    np.testing.assert_allclose(v_fresh, v_full, atol=1e-5)


def test_duplicate_crops_are_embedded_once(tmp_path: Path, demo: Path, embedder: embed.Embedder) -> None:
    run = tmp_path / "run"
    catalog = _make_upstream(run, demo)
    boxes = _boxes(catalog)
    dup = boxes[boxes["crop_index"] == 0].iloc[[0]].assign(crop_index=7)  # same image and box again
    _write_stage(run / "detect", "boxes.parquet", pd.concat([boxes, dup], ignore_index=True))
    counter = ForwardCounter(embedder)
    try:
        result = embed.run(_cfg(run, tmp_path / "_cache"), embedder=embedder, progress=False)
    finally:
        counter.close()
    assert counter.images == 15 and result.n_items == 16
    vectors, items = _vectors(run)
    pid = dup["product_id"].iloc[0]
    rows = items.index[items["product_id"] == pid]
    np.testing.assert_array_equal(vectors[rows[0]], vectors[rows[-1]])


def test_gpu_style_decode_matches_the_cpu_path(tmp_path: Path) -> None:
    """The nvjpeg path's tensor ops (orientation, crop, resize, pad) run on CPU tensors here."""
    rng = np.random.default_rng(0)
    base = (rng.random((90, 160, 3)) * 40 + np.linspace(0, 200, 160)[None, :, None]).astype(np.uint8)
    box = (10.0, 5.0, 70.0, 85.0)
    for orientation in range(1, 9):
        path = tmp_path / f"o{orientation}.jpg"
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(base).save(path, quality=95, exif=exif.tobytes())
        for mode in embed.RESIZE_MODES:
            cpu = embed.prepare_pil(load_rgb(path), box, 32, mode).astype(np.int16)
            sample = embed.CropDataset([str(path)], np.array([box]), 32, mode, raw_jpeg=True)[0]
            assert sample[0] == "jpeg" and sample[3] == orientation
            tensor = embed.gpu_batch([sample], 32, mode, "cpu")[0].permute(1, 2, 0).numpy().astype(np.int16)
            assert np.abs(cpu - tensor).mean() < 2.0, (orientation, mode)


def test_tensor_preprocessing_reproduces_pil_resize(demo: Path, tmp_path: Path) -> None:
    photos = sorted((demo / "images").iterdir())[:4]
    for path in photos:
        img = load_rgb(path)
        for box in [(0.0, 0.0, float(img.width), float(img.height)), (13.4, 20.7, img.width * 0.6, img.height - 5.2)]:
            for mode in embed.RESIZE_MODES:
                ours = embed.prepare_pil(img, box, 224, mode).astype(np.int16)
                reference = embed.pil_resize_reference(img, box, 224, mode).astype(np.int16)
                assert np.abs(ours - reference).max() <= 1, (path.name, box, mode)
                assert np.abs(ours - reference).mean() < 0.1  # off-by-one rounding in a few pixels only
                np.testing.assert_array_equal(ours, embed.decode_crop_chw(path, box, 224, mode).permute(1, 2, 0).numpy())


def test_jpeg_draft_decode_matches_full_decode(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:1200, 0:1600]
    big = np.stack([xx % 256, yy % 256, (xx + yy) // 12 % 256], -1).astype(np.uint8)
    big = np.clip(big.astype(np.int16) + rng.integers(-5, 5, big.shape), 0, 255).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(big).save(path, quality=92)
    box = (100.0, 200.0, 1500.0, 1100.0)
    fast = embed.decode_crop_chw(path, box, 64, "pad").permute(1, 2, 0).numpy().astype(np.int16)
    full = embed.prepare_pil(load_rgb(path), box, 64, "pad").astype(np.int16)
    assert fast.shape == full.shape == (64, 64, 3)
    assert np.abs(fast - full).mean() < 4.0


def test_feature_store_keys_and_guards(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path, "m1", 4)
    keys = [item_key("a" * 64, (0, 0, 10, 10)), item_key("a" * 64, (0, 0, 10, 10.04)), item_key("b" * 64, (0, 0, 10, 10))]
    assert keys[0] == keys[1] != keys[2]  # boxes equal to 0.1 px share a key
    store.put(keys[::2], np.eye(4, dtype=np.float32)[:2])
    reopened = FeatureStore(tmp_path, "m1", 4)
    assert reopened.contains(keys).tolist() == [True, True, True] and len(reopened) == 2
    np.testing.assert_array_equal(reopened.get([keys[2], keys[0]]), np.eye(4, dtype=np.float32)[[1, 0]])
    with pytest.raises(ConfigError, match="belongs to model"):
        FeatureStore(tmp_path / "other", "m1", 4)
        FeatureStore(tmp_path / "other", "m1", 5)
    with pytest.raises(ValueError, match="non-finite"):
        store.put([keys[0]], np.full((1, 4), np.nan, np.float32))


def test_clear_errors_for_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown parameter 'pca'"):
        EmbedConfig.from_params({"pca": 3})
    with pytest.raises(ConfigError, match="unknown backbone 'resnet5'"):
        embed.build_embedder("resnet5", device="cpu")
    with pytest.raises(ConfigError, match="torch hub cache"):
        embed.build_embedder("resnet50", device="cpu")  # never downloads; random init only when asked
    with pytest.raises(ConfigError, match="does not exist"):
        embed.build_embedder(weights=str(tmp_path / "nope.pth"), device="cpu")
    with pytest.raises(ConfigError, match="needs the output of stage 'extract'"):
        embed.run(_cfg(tmp_path / "empty", tmp_path / "_cache"))


def _synthetic_upstream(run_dir: Path, n: int = 12) -> None:
    """Upstream folders over generated JPEGs (no demo catalog): shapes on white, one with EXIF orientation 6."""
    rng = np.random.default_rng(3)
    folder = run_dir.parent / f"{run_dir.name}-jpegs"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        w, h = int(rng.integers(180, 420)), int(rng.integers(180, 420))
        img = np.full((h, w, 3), 250, np.uint8)
        x0, y0 = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
        img[y0:y0 + h // 2, x0:x0 + w // 2] = rng.integers(0, 200, 3)
        img = np.clip(img + rng.integers(-8, 8, img.shape), 0, 255).astype(np.uint8)
        exif = Image.Exif()
        if i == 0:
            exif[0x0112] = 6
        path = folder / f"{i:03d}.jpg"
        Image.fromarray(img).save(path, quality=90, exif=exif.tobytes())
        rows.append({"product_id": f"S{i:03d}", "image_path": str(path), "category": "shape"})
    catalog = pd.DataFrame(rows)
    _refresh_fetch_columns(catalog)
    catalog[["width", "height"]] = [load_rgb(p).size for p in catalog["image_path"]]  # EXIF-transposed sizes
    _write_stage(run_dir / "extract", "catalog.parquet", catalog)
    _write_stage(run_dir / "detect", "boxes.parquet", _boxes(catalog))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pipeline_matches_cpu(tmp_path: Path, embedder: embed.Embedder) -> None:
    run_cpu, run_gpu = tmp_path / "cpu", tmp_path / "gpu"
    _synthetic_upstream(run_cpu)
    _synthetic_upstream(run_gpu)
    embed.run(_cfg(run_cpu, tmp_path / "c1"), embedder=embedder, progress=False)
    gpu_cfg = EmbedConfig(run_dir=str(run_gpu), cache_dir=str(tmp_path / "c2"), device="cuda", batch_size=8,
                          num_workers=2)
    result = embed.run(gpu_cfg, progress=False)  # nvjpeg decode (EXIF orientation on the GPU) + bf16 autocast
    assert result.metrics["device"].startswith("cuda") and result.counts["embedded"] == 15
    v_cpu, items_cpu = _vectors(run_cpu)
    v_gpu, items_gpu = _vectors(run_gpu)
    pd.testing.assert_frame_equal(items_cpu.drop(columns="image_sha256"), items_gpu.drop(columns="image_sha256"))
    cosine = (v_cpu * v_gpu).sum(axis=1)
    assert cosine.min() > 0.97, cosine


def test_projection_head_from_a_file(tmp_path: Path, demo: Path) -> None:
    from niteru.heads import ProjectionHead, save_head

    torch.manual_seed(0)
    spec = save_head(ProjectionHead(1280, out_dim=24, hidden_dim=0), tmp_path / "head.pt", {"note": "untrained"})
    run = tmp_path / "run"
    _make_upstream(run, demo)
    result = embed.run(_cfg(run, tmp_path / "_cache", head=spec), progress=False)
    vectors, _ = _vectors(run)
    assert vectors.shape == (15, 24) and result.dim == 24
    rebuilt = embed.load_embedder(run / "embed" / "model.json")
    assert rebuilt.model_id == result.model_id and "-h" in result.model_id
    config, state = rebuilt.export()
    (tmp_path / "head.pt").unlink()  # the export alone rebuilds the head
    clone = embed.Embedder.from_export(config, state)
    photo = Image.open(demo / "images" / sorted(p.name for p in (demo / "images").iterdir())[0]).convert("RGB")
    np.testing.assert_allclose(clone.embed([photo]), rebuilt.embed([photo]), atol=1e-5)
