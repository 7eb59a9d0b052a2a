"""Category precision@10 on ../shared/datasets/clothing-small (3,068 photos, 10 categories).

    .venv/bin/python benchmarks/quality_clothing.py [--cache-dir runs/_cache] [--device auto] [--aug-views 2]
                                                     [--skip-crops] [--skip-head]

Rows (cosine kNN, leave-one-out, same protocol as the known baseline):

* ``mobilenet_v2 whole (known)``: the baseline quoted in issue 8 (frozen ImageNet MobileNetV2, whole image,
  224 px): 0.66. Quoted, not re-measured (its weights are not installed here).
* ``<backbone> whole``: the default backbone (EfficientNet-Lite0, shipped ImageNet weights), whole image.
* ``<backbone> saliency crop``: the same on the crop the detect stage's default detector chooses
  (``saliency``, policy ``largest``, min_score 0.2; whole image when nothing qualifies).
* ``frozen, held-out 20%`` / ``head, held-out 20%``: precision@10 inside the fixed content-hash test split,
  for the frozen features and for a projection head trained (``niteru.train``) on the other 80%.

Backbone features are cached under ``<cache-dir>/train_features`` (shared with the training notebook), so a
second run takes seconds. Results: benchmarks/results/quality_clothing.json.
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
from pathlib import Path


from niteru.io import write_json_atomic
from niteru import detect, train
from niteru.embed import build_embedder
from niteru.images import load_rgb

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT.parent / "shared" / "datasets" / "clothing-small" / "train"
RESULTS = ROOT / "benchmarks" / "results"
KNOWN_MOBILENET_V2 = 0.66


def saliency_crops(paths: list[str], batch_size: int = 32, policy: str = "largest", min_score: float = 0.2
                   ) -> tuple[list[tuple[float, float, float, float] | None], float, float]:
    """Crop box per image (None = whole image), the whole-image fallback rate and detection images/s."""
    from tqdm.auto import tqdm

    detector = detect.SaliencyDetector()
    boxes: list[tuple[float, float, float, float] | None] = []
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(paths), batch_size), desc="saliency", unit="batch"):
        images = [load_rgb(p) for p in paths[start:start + batch_size]]
        for img, found in zip(images, detector.detect(images)):
            box = detect.select_crops(found, policy, min_score, img.size)[0]
            boxes.append(None if box.method == detect.WHOLE else (box.x0, box.y0, box.x1, box.y1))
    seconds = time.perf_counter() - t0
    return boxes, sum(b is None for b in boxes) / len(boxes), len(paths) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATASET))
    ap.add_argument("--cache-dir", default=str(ROOT / "runs" / "_cache"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--aug-views", type=int, default=2)
    ap.add_argument("--loss", default="proxy")
    ap.add_argument("--skip-crops", action="store_true")
    ap.add_argument("--skip-head", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not Path(args.data).is_dir():
        raise SystemExit(f"dataset not found at {args.data}")

    cache = Path(args.cache_dir).resolve() / "train_features"
    data = train.list_labelled_images(args.data)
    labels = data["label"].to_numpy()
    paths, shas = data["path"].tolist(), data["sha256"].tolist()
    embedder = build_embedder(args.backbone, device=args.device)
    rows: list[dict[str, object]] = [{"variant": "mobilenet_v2 whole (known baseline)", "n": len(data),
                                      f"p@{args.k}": KNOWN_MOBILENET_V2, "measured": False}]
    t0 = time.perf_counter()
    whole = train.compute_features(embedder, paths, shas, 0, 0, cache, desc="whole images")
    rows.append({"variant": f"{args.backbone} whole", "n": len(data), "measured": True,
                 f"p@{args.k}": round(train.precision_at_k(whole, labels, args.k), 4),
                 "seconds": round(time.perf_counter() - t0, 1)})
    extra: dict[str, object] = {}
    if not args.skip_crops:
        t0 = time.perf_counter()
        boxes, fallback, det_ips = saliency_crops(paths)
        crops = train.compute_features(embedder, paths, shas, 0, 0, cache, boxes=boxes, desc="saliency crops")
        rows.append({"variant": f"{args.backbone} saliency crop", "n": len(data), "measured": True,
                     f"p@{args.k}": round(train.precision_at_k(crops, labels, args.k), 4),
                     "seconds": round(time.perf_counter() - t0, 1)})
        extra.update(saliency_whole_fallback_rate=round(fallback, 4), saliency_images_per_s=round(det_ips, 1))
    if not args.skip_head:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = train.TrainConfig(data_dir=args.data, run_dir=str(Path(tmp) / "run"), cache_dir=str(cache.parent),
                                    device=args.device, backbone=args.backbone, aug_views=args.aug_views,
                                    loss=args.loss, k=args.k, register_as="")
            result = train.run(cfg)
        m = result.metrics
        rows.append({"variant": f"{args.backbone} frozen, held-out 20%", "n": m["n_test"], "measured": True,
                     f"p@{args.k}": m[f"frozen_test_p@{args.k}"]})
        rows.append({"variant": f"{args.backbone} + {args.loss} head, held-out 20%", "n": m["n_test"], "measured": True,
                     f"p@{args.k}": m[f"head_test_p@{args.k}"], "seconds": m["train_seconds"]})
        extra.update(head_train_params={k: v for k, v in cfg.model_dump().items() if k not in ("run_dir", "cache_dir")},
                     head_target_met=m["target_met"])

    width = max(len(str(r["variant"])) for r in rows)
    print(f"\n{'variant':<{width}}  {'n':>5}  {'p@' + str(args.k):>7}")
    for r in rows:
        print(f"{r['variant']:<{width}}  {r['n']:>5}  {r[f'p@{args.k}']:>7.4f}" + ("" if r["measured"] else "  (quoted)"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"dataset": args.data, "k": args.k, "rows": rows, **extra, "embedder": embedder.feature_model_id,
           "device": embedder.device, "machine": platform.platform(), "python": platform.python_version()}
    write_json_atomic(RESULTS / "quality_clothing.json", out)
    print(f"\nwrote {RESULTS / 'quality_clothing.json'}")


if __name__ == "__main__":
    main()
