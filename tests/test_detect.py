"""Detection stage: real boxes on generated photos with a known product rectangle, crop policies, the
whole-image fallback, torchvision architectures with file weights, the detection cache and sharding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from niteru import detect
from niteru.detect import (
    Box,
    DetectConfig,
    SaliencyDetector,
    TorchvisionDetector,
    crop,
    load_detector,
    select_crops,
    whole_box,
)
from niteru.errors import ConfigError
from niteru.io import sha256_file, write_parquet_atomic
from niteru.runs import write_stage_summary


def product_photo(rng: np.random.Generator, width: int, height: int, two_tone: bool = False) -> tuple[Image.Image, Box]:
    """A noisy plain (or wall+floor) background with a textured product rectangle at a random place."""
    bg = rng.integers(150, 256, 3).astype(float)
    arr = bg + rng.normal(0, 6, (height, width, 3))
    if two_tone:  # the lower part of the frame is a different surface
        arr[int(height * 0.75):] = rng.integers(90, 140, 3) + rng.normal(0, 6, (height - int(height * 0.75), width, 3))
    x0, y0 = int(rng.integers(4, width // 3)), int(rng.integers(4, height // 3))
    x1, y1 = int(rng.integers(2 * width // 3, width - 4)), int(rng.integers(2 * height // 3, height - 4))
    colour = rng.integers(0, 256, 3).astype(float)
    stripes = (np.arange(x1 - x0)[None, :, None] // 6 % 2) * 40.0
    arr[y0:y1, x0:x1] = colour + stripes + rng.normal(0, 20, (y1 - y0, x1 - x0, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), Box(x0, y0, x1, y1)


# ----------------------------------------------------------------------------------- saliency boxes
def test_saliency_finds_the_product_rectangle():
    rng = np.random.default_rng(3)
    photos = [product_photo(rng, int(rng.integers(160, 480)), int(rng.integers(160, 480)), two_tone=i % 3 == 0)
              for i in range(24)]
    found = SaliencyDetector().detect([img for img, _ in photos])
    ious = [boxes[0].iou(truth) for boxes, (_, truth) in zip(found, photos)]
    assert all(len(b) == 1 for b in found)
    assert min(ious) > 0.8, ious
    assert np.mean(ious) > 0.85
    assert all(b[0].method == "saliency" and 0.5 < b[0].score <= 1.0 for b in found)


def test_saliency_without_a_product_gives_no_box_and_falls_back_to_whole():
    rng = np.random.default_rng(0)
    plain = Image.fromarray(np.clip(200 + rng.normal(0, 4, (120, 160, 3)), 0, 255).astype(np.uint8))
    full = Image.fromarray(np.clip(rng.integers(0, 256, 3) + rng.normal(0, 30, (120, 160, 3)), 0, 255).astype(np.uint8))
    found = SaliencyDetector().detect([plain, full])
    assert found == [[], []]
    for img, boxes in zip([plain, full], found):
        chosen = select_crops(boxes, "largest", 0.2, img.size)
        assert chosen == [Box(0.0, 0.0, 160.0, 120.0, 1.0, "image", "whole")]


def test_saliency_is_batch_independent():
    rng = np.random.default_rng(5)
    photos = [product_photo(rng, 200, 260)[0] for _ in range(5)]
    together = SaliencyDetector().detect(photos)
    alone = [SaliencyDetector().detect([p])[0] for p in photos]
    for a, b in zip(together, alone):
        assert a[0].iou(b[0]) > 0.999


# ----------------------------------------------------------------------------------------- policies
def test_crop_policies():
    size = (400, 300)
    boxes = [Box(10, 10, 100, 100, 0.9, "a", "m"), Box(50, 50, 390, 290, 0.5, "b", "m"),
             Box(0, 0, 30, 30, 0.1, "c", "m"), Box(-20, 280, 500, 340, 0.95, "d", "m")]
    largest = select_crops(boxes, "largest", 0.3, size)
    assert largest == [boxes[1]]
    every = select_crops(boxes, "all", 0.3, size)
    assert [b.label for b in every] == ["d", "a", "b"]  # best score first, clipped to the image
    assert every[0] == Box(0, 280, 400, 300, 0.95, "d", "m")
    assert select_crops(boxes, "all", 0.99, size) == [whole_box(size)]
    assert select_crops(boxes, "whole", 0.0, size) == [whole_box(size)]
    assert select_crops([], "largest", 0.0, size) == [whole_box(size)]
    # a sliver thinner than min_side is not a crop
    assert select_crops([Box(0, 0, 400, 5, 0.9)], "largest", 0.0, size) == [whole_box(size)]
    with pytest.raises(ConfigError, match="unknown crop policy 'biggest'"):
        select_crops(boxes, "biggest", 0.3, size)


def test_crop_cuts_the_box_pixels():
    arr = np.zeros((50, 80, 3), np.uint8)
    arr[10:20, 30:60] = 255
    img = Image.fromarray(arr)
    out = crop(img, Box(30, 10, 60, 20))
    assert out.size == (30, 10) and np.asarray(out).min() == 255
    assert crop(img, whole_box(img.size)) is img
    assert crop(img, Box(29.5, 9.2, 60.1, 20.0)).size == (32, 11)  # rounded outwards


# -------------------------------------------------------------------------------------- torchvision
def test_torchvision_architecture_loads_a_state_dict_from_a_file(tmp_path):
    import torch

    model = detect.build_torchvision_detector("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3)
    weights = tmp_path / "det.pt"
    torch.save(model.state_dict(), weights)
    spec = {"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": str(weights), "num_classes": 3,
            "labels": ["background", "top", "shoe"]}
    det = load_detector(spec)
    assert isinstance(det, TorchvisionDetector)
    assert det.spec["weights_sha256"] == sha256_file(weights)
    loaded = det.model.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())
    rng = np.random.default_rng(0)
    out = det.detect([product_photo(rng, 200, 160)[0], product_photo(rng, 120, 240)[0]])
    assert len(out) == 2 and all(isinstance(b, Box) for boxes in out for b in boxes)
    # the spec round-trips: same detector id, and a changed file is refused
    assert detect.detector_key(load_detector(det.spec).spec) == detect.detector_key(det.spec)
    torch.save({"model": model.state_dict(), "epoch": 3}, weights)  # wrapped checkpoints load too
    with pytest.raises(ConfigError, match="weights file changed"):
        load_detector(det.spec)
    assert load_detector({**spec}).spec["weights_sha256"] == sha256_file(weights)


def test_torchvision_weights_must_fit_and_are_never_downloaded(tmp_path, monkeypatch):
    import torch

    weights = tmp_path / "ssd.pt"
    torch.save(detect.build_torchvision_detector("ssdlite320_mobilenet_v3_large", num_classes=5).state_dict(), weights)
    with pytest.raises(ConfigError, match="do not fit ssdlite320_mobilenet_v3_large with 91 classes"):
        load_detector({"name": "ssdlite320_mobilenet_v3_large", "weights": str(weights)})
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(ConfigError, match="not in the local cache"):
        load_detector({"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "torchvision:DEFAULT"})
    with pytest.raises(ConfigError, match="needs weights"):
        load_detector("fcos_resnet50_fpn")
    with pytest.raises(ConfigError, match="unknown detector 'yolo'"):
        load_detector("yolo")
    with pytest.raises(ConfigError, match="takes no weights"):
        DetectConfig(weights="x.pt").detector_spec()


# --------------------------------------------------------------------------------------------- stage
def make_extract(run_dir: Path, n: int, seed: int = 0, start: int = 0) -> dict[str, Box]:
    """An extract/ folder per docs/architecture.md with generated photos; returns product_id -> true box."""
    rng = np.random.default_rng(seed)
    images = run_dir.parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows, truth = [], {}
    for i in range(start, start + n):
        img, box = product_photo(rng, int(rng.integers(180, 320)), int(rng.integers(180, 320)))
        path = images / f"p{i:03d}.png"
        img.save(path)
        pid = f"p{i:03d}"
        truth[pid] = box
        rows.append({"product_id": pid, "image_uri": str(path), "category": "top", "brand": "b", "price": 1.0,
                     "in_stock": True, "image_sha256": sha256_file(path), "image_path": str(path),
                     "width": img.size[0], "height": img.size[1], "fetch_status": "ok", "fetch_error": None})
    extract = run_dir / "extract"
    old = pd.read_parquet(extract / "catalog.parquet") if (extract / "catalog.parquet").exists() else None
    frame = pd.concat([old, pd.DataFrame(rows)], ignore_index=True) if old is not None else pd.DataFrame(rows)
    write_parquet_atomic(extract / "catalog.parquet", frame)
    write_stage_summary(extract, counts={"products": len(frame)})
    return truth


def test_stage_writes_boxes_and_reuses_the_cache(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    truth = make_extract(run_dir, 10)
    cfg = DetectConfig(run_dir=str(run_dir), device="cpu", batch_size=4, audit_n=4)
    result = detect.run(cfg)
    boxes = pd.read_parquet(run_dir / "detect" / "boxes.parquet")
    assert list(boxes.columns) == list(detect.BOX_COLUMNS)
    assert boxes["product_id"].tolist() == sorted(truth) and (boxes["crop_index"] == 0).all()
    ious = [Box(r.x0, r.y0, r.x1, r.y1).iou(truth[r.product_id]) for r in boxes.itertuples()]
    assert min(ious) > 0.8
    assert result.counts["detected"] == 10 and result.counts["cached"] == 0
    assert result.metrics["whole_image_rate"] == 0.0
    record = detect.read_json(run_dir / "detect" / "detector.json")
    assert record["spec"]["name"] == "saliency" and record["policy"] == "largest"
    assert (run_dir / "detect" / "audit.png").stat().st_size > 1000
    assert (run_dir / "detect" / "stage.json").exists()

    # the next day: 3 new photos; only they are detected, the rest comes from the cache
    run2 = tmp_path / "runs" / "r2"
    (run2 / "extract").mkdir(parents=True)
    (run2 / "extract" / "catalog.parquet").write_bytes((run_dir / "extract" / "catalog.parquet").read_bytes())
    truth.update(make_extract(run2, 3, seed=1, start=10))
    again = detect.run(cfg.model_copy(update={"run_dir": str(run2)}))
    assert again.counts == {**again.counts, "detected": 3, "cached": 10, "products": 13}
    pd.testing.assert_frame_equal(again.boxes[again.boxes["product_id"] < "p010"].reset_index(drop=True), boxes)
    # the crop policy applies after the cache: switching to whole images detects nothing new
    whole = detect.run(cfg.model_copy(update={"run_dir": str(run2), "policy": "whole"}))
    assert whole.counts["detected"] == 0 and (whole.boxes["method"] == "whole").all()


def test_undecodable_image_keeps_its_product_with_the_whole_image(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    make_extract(run_dir, 3)
    catalog = pd.read_parquet(run_dir / "extract" / "catalog.parquet")
    Path(catalog["image_path"].iloc[1]).write_bytes(b"\xff\xd8 not really a jpeg")
    result = detect.run(DetectConfig(run_dir=str(run_dir), device="cpu", audit_n=0))
    row = result.boxes[result.boxes["product_id"] == "p001"].iloc[0]
    assert result.counts["decode_failures"] == 1 and len(result.boxes) == 3
    assert row["method"] == "whole" and (row["x1"], row["y1"]) == (catalog["width"].iloc[1], catalog["height"].iloc[1])


def test_shards_merge_to_the_unsharded_result(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    make_extract(run_dir, 12)
    base = DetectConfig(run_dir=str(run_dir), device="cpu", audit_n=0, use_cache=False)
    whole = detect.run(base).boxes
    sharded = base.model_copy(update={"num_shards": 3})
    with pytest.raises(ConfigError, match="missing or incomplete"):
        detect.merge_shards(sharded)
    sizes = [len(detect.run(sharded.model_copy(update={"shard_index": i})).boxes) for i in range(3)]
    assert sum(sizes) == 12 and all(s > 0 for s in sizes)
    merged = detect.merge_shards(sharded)
    pd.testing.assert_frame_equal(merged.boxes, whole)
    assert merged.counts["products"] == 12


def test_notebook_runs_the_stage(tmp_path):
    import papermill

    run_dir = tmp_path / "runs" / "nb"
    make_extract(run_dir, 4)
    out = tmp_path / "out.ipynb"
    papermill.execute_notebook(str(Path(__file__).resolve().parents[1] / "notebooks" / "02_detect.ipynb"), str(out),
                               parameters={"run_dir": str(run_dir), "device": "cpu", "audit_n": 4},
                               progress_bar=False, kernel_name="python3", cwd=str(tmp_path))
    text = out.read_text()
    assert "image/png" in text  # the audit figure is in the output notebook
    assert len(pd.read_parquet(run_dir / "detect" / "boxes.parquet")) == 4
