"""End-to-end decode + detect + embed throughput on a CUDA GPU, and the embed stage's GPU path.

    python benchmarks/bench_gpu.py --images DIR [--passes 3] [--batch-size 256] [--workers 12] [--out FILE]

Measures, on the JPEGs under DIR (e.g. a copy of ../shared/datasets/clothing-small):

* ``e2e``: DataLoader workers read bytes (+ EXIF orientation) -> nvjpeg batch decode on the GPU
  (``torchvision.io.decode_jpeg(device="cuda")``) -> the class-agnostic saliency detector
  (``niteru.detect.saliency_boxes``) on a 128 px copy -> crop of the detected box and antialiased resize on
  the GPU -> EfficientNet-Lite0 (shipped ImageNet weights) under bf16 autocast, channels_last -> L2 vectors.
* ``embed-only``: :meth:`niteru.embed.Embedder.iter_features` (nvjpeg + bf16) on the whole images.
* ``model-only``: the backbone on a resident uint8 batch (upper bound without decode).
* ``cpu-decode``: the same pipeline with PIL decoding in the workers (``gpu_decode=False``).

and checks that GPU vectors agree with the CPU fp32 path (cosine). Prints a table; writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from niteru.io import write_json_atomic
from niteru import embed
from niteru.detect import SaliencyDetector, saliency_boxes


def list_images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*.jpg"))


def sync() -> None:
    torch.cuda.synchronize()


PHASES: dict[str, float] = {}


def _tick(name: str, t0: float) -> float:
    """Add the time since ``t0`` (GPU work included) to phase ``name``; return now."""
    sync()
    now = time.perf_counter()
    PHASES[name] = PHASES.get(name, 0.0) + now - t0
    return now


def e2e_pass(emb: embed.Embedder, det: SaliencyDetector, paths: list[str], batch_size: int, workers: int) -> int:
    """One pass: decode on GPU, detect, crop, embed. Returns the number of images embedded."""
    from torchvision.io import ImageReadMode, decode_jpeg

    dataset = embed.CropDataset(paths, np.zeros((len(paths), 4)), emb.input_size, emb.resize, raw_jpeg=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=list, prefetch_factor=4 if workers else None)
    done = 0
    work = det.work_size
    t = time.perf_counter()
    for samples in loader:
        t = _tick("wait for loader (read bytes + EXIF)", t)
        images = decode_jpeg([s[1] for s in samples], mode=ImageReadMode.RGB, device=emb.device)
        images = [embed.orient_chw(img, s[3]) for img, s in zip(images, samples)]
        t = _tick("nvjpeg decode", t)
        # detection on a small square copy; images of the same size are resized together
        small = torch.empty((len(images), 3, work, work), device=emb.device)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(tuple(img.shape[1:]), []).append(i)
        for idx in by_size.values():
            stack = torch.stack([images[i] for i in idx]).float().div_(255.0)
            small[idx] = F.interpolate(stack, size=(work, work), mode="bilinear", antialias=True, align_corners=False)
        with torch.inference_mode():
            boxes, scores, fractions = saliency_boxes(small, det.border)
        boxes, fractions = boxes.cpu().tolist(), fractions.cpu().tolist()
        t = _tick("detect (128 px resize + saliency)", t)
        crops = []
        for img, box, frac in zip(images, boxes, fractions):
            h, w = img.shape[1:]
            if det.min_area <= frac <= det.max_area:
                sx, sy = w / work, h / work
                px = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
            else:
                px = (0.0, 0.0, float(w), float(h))
            crops.append(embed.prepare_tensor(img, px, emb.input_size, emb.resize))
        batch = torch.stack(crops)
        t = _tick("crop + resize + pad (per image)", t)
        feats = emb.forward_uint8(batch)
        embed.l2_normalize(feats)
        done += len(feats)
        t = _tick("embed (bf16) + copy to host", t)
    return done


def timed(fn, *args, passes: int = 1) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    sync()
    t0 = time.perf_counter()
    n = sum(fn(*args) for _ in range(passes))
    sync()
    return n, time.perf_counter() - t0


def embed_only(emb: embed.Embedder, paths: list[str], boxes: np.ndarray, batch_size: int, workers: int,
               gpu_decode: bool) -> int:
    return sum(len(f) for _, f in emb.iter_features(paths, boxes, batch_size, workers, gpu_decode, progress=False))


def model_only(emb: embed.Embedder, batch_size: int, steps: int) -> int:
    batch = torch.randint(0, 255, (batch_size, 3, emb.input_size, emb.input_size), dtype=torch.uint8,
                          device=emb.device)
    with torch.inference_mode():
        for _ in range(steps):
            x = batch.float().sub_(emb._mean).div_(emb._std).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                emb.network(x)
    return batch_size * steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--out", default="benchmarks/results/bench_gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU")

    paths = list_images(Path(args.images))
    boxes = np.array([(0.0, 0.0, *map(float, Image.open(p).size)) for p in paths])
    mb = sum(os.path.getsize(p) for p in paths) / 1e6
    emb = embed.build_embedder(device="cuda")
    det = SaliencyDetector(device="cuda")
    print(f"{len(paths)} JPEGs ({mb:.1f} MB) from {args.images}; {torch.cuda.get_device_name()}; torch {torch.__version__}")

    # warm-up (cudnn autotune, nvjpeg handles, worker start)
    e2e_pass(emb, det, paths[: args.batch_size], args.batch_size, 0)
    model_only(emb, args.batch_size, 3)

    rows = []
    n, t = timed(model_only, emb, args.batch_size, 40)
    rows.append(("model-only (resident uint8 batch, bf16)", n, t))
    PHASES.clear()
    n, t = timed(e2e_pass, emb, det, paths, args.batch_size, args.workers, passes=args.passes)
    rows.append((f"e2e nvjpeg decode + saliency detect + crop + embed ({args.workers} workers)", n, t))
    phases = {k: round(v, 3) for k, v in PHASES.items()}
    n, t = timed(embed_only, emb, paths, boxes, args.batch_size, args.workers, True, passes=args.passes)
    rows.append(("embed stage path, nvjpeg decode (whole images)", n, t))
    n, t = timed(embed_only, emb, paths, boxes, args.batch_size, args.workers, False, passes=args.passes)
    rows.append(("embed stage path, PIL decode in workers", n, t))

    # agreement of the GPU path (nvjpeg + bf16) with the CPU fp32 path
    sample = paths[:: max(1, len(paths) // 64)][:64]
    sboxes = np.array([(0.0, 0.0, *map(float, Image.open(p).size)) for p in sample])
    gpu = np.concatenate([f for _, f in emb.iter_features(sample, sboxes, 64, 0, True, progress=False)])
    cpu_emb = embed.build_embedder(device="cpu")
    cpu = np.concatenate([f for _, f in cpu_emb.iter_features(sample, sboxes, 64, 0, False, progress=False)])
    cosine = (embed.l2_normalize(gpu) * embed.l2_normalize(cpu)).sum(axis=1)

    print(f"{'variant':<75} {'images':>7} {'seconds':>8} {'img/s':>9}")
    results = []
    for name, n, t in rows:
        print(f"{name:<75} {n:>7} {t:>8.2f} {n / t:>9.0f}")
        results.append({"variant": name, "images": n, "seconds": round(t, 3), "images_per_s": round(n / t, 1)})
    print("e2e time by phase (s, all passes):", phases)
    print(f"GPU (nvjpeg+bf16) vs CPU (PIL+fp32) cosine: min {cosine.min():.4f} mean {cosine.mean():.4f}")
    payload = {"benchmark": "gpu_e2e", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "images": len(paths), "megabytes": round(mb, 1), "batch_size": args.batch_size,
               "workers": args.workers, "passes": args.passes, "cpu_count": os.cpu_count(), "results": results,
               "e2e_phases_s": phases,
               "gpu_vs_cpu_cosine": {"min": float(cosine.min()), "mean": float(cosine.mean())}}
    out = write_json_atomic(Path(args.out), payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
