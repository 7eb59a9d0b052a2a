"""Deterministic synthetic product catalog with real JPEG photos and ground truth.

Each *product* (``group_id``) is a garment of one category, colour and pattern; it is "photographed"
``variants`` times with a different background, scale, position, rotation, crop and lighting. Every
photo is one catalog row (``product_id`` = ``<group_id>-v<j>``), so retrieval quality can be measured
by category (precision@k), by colour, and by instance (other photos of the same product).

The same ``(n_products, variants, seed, image_size)`` always gives byte-identical images and tables.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

log = logging.getLogger(__name__)

#: Bump when the generator's output changes, so cached demo catalogs are regenerated.
GENERATOR_VERSION = 1
DONE_MARKER = ".complete"

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 40), "navy": (25, 35, 90), "black": (25, 25, 28), "white": (235, 235, 230),
    "green": (40, 130, 60), "yellow": (235, 200, 40), "pink": (235, 130, 170), "brown": (120, 75, 40),
    "grey": (130, 130, 135), "sky": (110, 170, 230),
}
PATTERNS = ("solid", "stripes", "dots", "check")
BRANDS = ("Asahi", "Kumo", "Mori", "Nami", "Sora", "Tsuki", "Yama", "Hoshi")
BASE_DATE = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

# Silhouettes in unit coordinates of the garment's box, and the box aspect ratio (width / height).
_SHAPES: dict[str, tuple[float, list[tuple[float, float]]]] = {
    "t-shirt": (1.0, [(0.3, 0), (0.42, 0.07), (0.58, 0.07), (0.7, 0), (1, 0.22), (0.87, 0.4), (0.78, 0.32),
                      (0.78, 1), (0.22, 1), (0.22, 0.32), (0.13, 0.4), (0, 0.22)]),
    "dress": (0.68, [(0.33, 0), (0.42, 0.05), (0.58, 0.05), (0.67, 0), (0.7, 0.36), (0.98, 1), (0.02, 1),
                     (0.3, 0.36)]),
    "pants": (0.6, [(0.12, 0), (0.88, 0), (0.97, 1), (0.6, 1), (0.5, 0.33), (0.4, 1), (0.03, 1)]),
    "skirt": (1.0, [(0.27, 0), (0.73, 0), (1, 1), (0, 1)]),
    "shorts": (1.25, [(0.08, 0), (0.92, 0), (1, 1), (0.57, 1), (0.5, 0.45), (0.43, 1), (0, 1)]),
    "longsleeve": (1.15, [(0.33, 0), (0.43, 0.06), (0.57, 0.06), (0.67, 0), (0.9, 0.12), (1, 0.95), (0.9, 0.97),
                          (0.76, 0.35), (0.76, 1), (0.24, 1), (0.24, 0.35), (0.1, 0.97), (0, 0.95), (0.1, 0.12)]),
    "shoes": (1.9, [(0, 0.55), (0.42, 0.45), (0.55, 0.08), (0.74, 0.08), (0.82, 0.45), (1, 0.68), (1, 1), (0, 1)]),
    "hat": (1.35, [(0.25, 0.62), (0.3, 0.2), (0.42, 0.02), (0.58, 0.02), (0.7, 0.2), (0.75, 0.62), (1, 0.75),
                   (0.97, 0.9), (0.5, 0.98), (0.03, 0.9), (0, 0.75)]),
}
CATEGORIES = tuple(_SHAPES)


@dataclass(frozen=True)
class Product:
    group_id: str
    category: str
    color: str
    pattern: str
    secondary: str
    pattern_scale: float
    pattern_angle: int
    brand: str
    price: float


@dataclass(frozen=True)
class Shot:
    """How one variant photo is taken."""

    background: tuple[int, int, int]
    textured: bool
    scale: float
    dx: float
    dy: float
    angle: float
    brightness: float
    contrast: float
    crop: float


def make_products(n_products: int, seed: int = 0) -> list[Product]:
    rng = np.random.default_rng([seed, 1])
    names = list(COLORS)
    products = []
    for i in range(n_products):
        category = CATEGORIES[i % len(CATEGORIES)]  # balanced categories
        color = names[int(rng.integers(len(names)))]
        secondary = names[int(rng.integers(len(names)))]
        if secondary == color:
            secondary = "white" if color != "white" else "black"
        products.append(Product(
            group_id=f"P{i:05d}", category=category, color=color,
            pattern=PATTERNS[int(rng.integers(len(PATTERNS)))], secondary=secondary,
            pattern_scale=float(rng.uniform(0.05, 0.14)), pattern_angle=int(rng.choice([0, 45, 90])),
            brand=BRANDS[int(rng.integers(len(BRANDS)))], price=round(float(rng.uniform(9, 240)), 2),
        ))
    return products


def make_shot(rng: np.random.Generator, variant: int) -> Shot:
    gray = int(rng.integers(205, 256))
    tint = rng.integers(-12, 13, size=3)
    background = tuple(int(np.clip(gray + t, 0, 255)) for t in tint)
    return Shot(
        background=background,  # type: ignore[arg-type]
        textured=bool(variant % 2 == 1 and rng.random() < 0.6),
        scale=float(rng.uniform(0.55, 0.85)), dx=float(rng.uniform(-0.08, 0.08)), dy=float(rng.uniform(-0.08, 0.08)),
        angle=float(rng.uniform(-14, 14)), brightness=float(rng.uniform(0.8, 1.2)),
        contrast=float(rng.uniform(0.85, 1.15)), crop=float(rng.uniform(0.0, 0.06)),
    )


def _pattern_texture(product: Product, width: int, height: int) -> Image.Image:
    base = COLORS[product.color]
    second = COLORS[product.secondary]
    img = Image.new("RGB", (width, height), base)
    if product.pattern == "solid":
        return img
    period = max(4, int(product.pattern_scale * max(width, height)))
    draw = ImageDraw.Draw(img)
    size = int(math.hypot(width, height)) + period
    if product.pattern == "stripes":
        layer = Image.new("RGB", (size * 2, size * 2), base)
        ldraw = ImageDraw.Draw(layer)
        for x in range(0, size * 2, period):
            ldraw.rectangle([x, 0, x + period // 2, size * 2], fill=second)
        layer = layer.rotate(product.pattern_angle, resample=Image.Resampling.BILINEAR)
        left, top = (layer.width - width) // 2, (layer.height - height) // 2
        return layer.crop((left, top, left + width, top + height))
    if product.pattern == "dots":
        radius = max(2, period // 4)
        for y in range(period // 2, height, period):
            offset = (period // 2) if (y // period) % 2 else 0
            for x in range(offset, width + period, period):
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=second)
        return img
    # check: a grid of thin lines in both directions
    line = max(2, period // 5)
    for x in range(0, width, period):
        draw.rectangle([x, 0, x + line, height], fill=second)
    for y in range(0, height, period):
        draw.rectangle([0, y, width, y + line], fill=second)
    return img


def _garment_layer(product: Product, box_w: int, box_h: int) -> tuple[Image.Image, Image.Image]:
    """The garment drawn on its own box: (RGB texture with shading, L mask)."""
    _, outline = _SHAPES[product.category]
    mask = Image.new("L", (box_w, box_h), 0)
    ImageDraw.Draw(mask).polygon([(x * (box_w - 1), y * (box_h - 1)) for x, y in outline], fill=255)
    texture = _pattern_texture(product, box_w, box_h)
    # soft shading: darker towards the bottom and the edges, like a photographed garment
    yy, xx = np.mgrid[0:box_h, 0:box_w].astype(np.float32)
    shade = 1.0 - 0.18 * (yy / max(box_h - 1, 1)) - 0.12 * np.abs(xx / max(box_w - 1, 1) - 0.5)
    arr = np.asarray(texture, dtype=np.float32) * shade[..., None]
    texture = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return texture, mask.filter(ImageFilter.GaussianBlur(0.8))


def render_photo(product: Product, shot: Shot, size: int = 256, seed: int = 0) -> Image.Image:
    """Render one product photo."""
    aspect, _ = _SHAPES[product.category]
    extent = shot.scale * size
    box_w, box_h = (int(extent), int(extent / aspect)) if aspect >= 1 else (int(extent * aspect), int(extent))
    texture, mask = _garment_layer(product, max(box_w, 8), max(box_h, 8))
    texture = texture.rotate(shot.angle, resample=Image.Resampling.BICUBIC, expand=True)
    mask = mask.rotate(shot.angle, resample=Image.Resampling.BICUBIC, expand=True)
    canvas = Image.new("RGB", (size, size), shot.background)
    if shot.textured:
        noise = np.random.default_rng(seed).normal(0, 9, size=(size // 8, size // 8, 1))
        bg = np.asarray(canvas, dtype=np.float32) + np.kron(noise, np.ones((8, 8, 1)))[:size, :size]
        canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    # a soft drop shadow under the garment
    shadow = Image.new("RGB", texture.size, (0, 0, 0))
    left = int(size / 2 - texture.width / 2 + shot.dx * size)
    top = int(size / 2 - texture.height / 2 + shot.dy * size)
    shadow_mask = mask.point(lambda v: int(v * 0.25)).filter(ImageFilter.GaussianBlur(4))
    canvas.paste(shadow, (left + 4, top + 5), shadow_mask)
    canvas.paste(texture, (left, top), mask)
    canvas = ImageEnhance.Brightness(canvas).enhance(shot.brightness)
    canvas = ImageEnhance.Contrast(canvas).enhance(shot.contrast)
    if shot.crop > 0:
        c = int(shot.crop * size)
        canvas = canvas.crop((c, c, size - c, size - c)).resize((size, size), Image.Resampling.BICUBIC)
    return canvas


def generate_demo_catalog(out_dir: str | os.PathLike[str], n_products: int = 50, variants: int = 2,
                          seed: int = 0, image_size: int = 256, in_stock_rate: float = 0.9):
    """Write ``images/*.jpg``, ``catalog.parquet`` and ``catalog.duckdb`` (table ``catalog``) to ``out_dir``.

    Returns the catalog as a pandas DataFrame. Deterministic for the same arguments.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    if n_products < 1 or variants < 1:
        raise ValueError(f"n_products and variants must be >= 1 (got {n_products}, {variants})")
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    products = make_products(n_products, seed)
    for i, product in enumerate(tqdm(products, desc="demo catalog", unit="product", leave=False)):
        rng = np.random.default_rng([seed, 2, i])
        for v in range(variants):
            shot = make_shot(rng, v)
            photo = render_photo(product, shot, image_size, seed=seed * 1_000_003 + i * 31 + v)
            product_id = f"{product.group_id}-v{v}"
            path = images / f"{product_id}.jpg"
            photo.save(path, format="JPEG", quality=90)
            rows.append({
                "product_id": product_id,
                "image_uri": str(path.resolve()),
                "category": product.category,
                "brand": product.brand,
                "price": product.price,
                "in_stock": bool(rng.random() < in_stock_rate),
                "updated_at": BASE_DATE + dt.timedelta(hours=int(rng.integers(0, 24 * 300))),
                "group_id": product.group_id,
                "color": product.color,
                "pattern": product.pattern,
                "title": f"{product.brand} {product.color} {product.pattern} {product.category}",
            })
    frame = pd.DataFrame(rows)
    frame["updated_at"] = pd.to_datetime(frame["updated_at"], utc=True).astype("datetime64[us, UTC]")
    write_catalog_files(frame, out)
    return frame


def write_catalog_files(frame, out_dir: str | os.PathLike[str]) -> None:
    """Write a catalog DataFrame as ``catalog.parquet`` and ``catalog.duckdb`` (table ``catalog``)."""
    import duckdb

    from niteru.io import atomic_path, write_parquet_atomic

    out = Path(out_dir)
    write_parquet_atomic(out / "catalog.parquet", frame)
    with atomic_path(out / "catalog.duckdb", suffix=".duckdb") as tmp:
        tmp.unlink()  # duckdb wants to create the file itself
        con = duckdb.connect(str(tmp))
        try:
            con.register("frame", frame)
            con.execute("CREATE TABLE catalog AS SELECT * FROM frame")
        finally:
            con.close()


def demo_key(n_products: int, variants: int, seed: int, image_size: int) -> str:
    return f"n{n_products}-v{variants}-s{seed}-px{image_size}-g{GENERATOR_VERSION}"


def ensure_demo_catalog(cache_dir: str | os.PathLike[str], n_products: int = 50, variants: int = 2,
                        seed: int = 0, image_size: int = 256) -> Path:
    """Generate the demo catalog once under ``<cache_dir>/demo/<key>/`` and return that folder.

    Generation happens in a temporary folder renamed into place, so an interrupted run never leaves a
    half-written catalog behind.
    """
    root = Path(cache_dir) / "demo"
    final = root / demo_key(n_products, variants, seed, image_size)
    if (final / DONE_MARKER).exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        log.info("generating demo catalog: %d products x %d photos -> %s", n_products, variants, final)
        generate_demo_catalog(tmp, n_products, variants, seed, image_size)
        # image URIs must point at the final location
        _rebase_uris(tmp, final)
        (tmp / DONE_MARKER).write_text("ok\n")
        if final.exists():  # an earlier interrupted attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _rebase_uris(folder: Path, final: Path) -> None:
    import pandas as pd

    frame = pd.read_parquet(folder / "catalog.parquet")
    frame["image_uri"] = [str(final / "images" / Path(u).name) for u in frame["image_uri"]]
    write_catalog_files(frame, folder)


def evolve_demo_catalog(base_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], day: int = 1,
                        removed: float = 0.05, new: float = 0.05, changed: float = 0.05,
                        availability: float = 0.05, image_size: int = 256):
    """Simulate the next day's catalog from a demo catalog folder, for incremental-run demos and tests.

    Drops a fraction of rows (``removed``), adds new products (``new``, rendered photos), re-shoots some
    photos (``changed``: a new image URI) and flips the in-stock flag of others (``availability``).
    Unchanged rows keep their image URIs. Returns the new catalog DataFrame (also written to ``out_dir``).
    """
    import pandas as pd

    base = pd.read_parquet(Path(base_dir) / "catalog.parquet")
    rng = np.random.default_rng([day, 99])
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    n = len(base)
    order = rng.permutation(n)
    n_removed, n_changed, n_avail = (int(round(f * n)) for f in (removed, changed, availability))
    drop = set(order[:n_removed])
    reshoot = order[n_removed:n_removed + n_changed]
    flip = order[n_removed + n_changed:n_removed + n_changed + n_avail]
    frame = base.copy()
    stamp = BASE_DATE + dt.timedelta(days=300 + day)
    for idx in reshoot:
        row = frame.iloc[idx]
        product = _product_from_row(row)
        photo = render_photo(product, make_shot(rng, 1), image_size, seed=day * 7919 + int(idx))
        path = out / "images" / f"{row['product_id']}-d{day}.jpg"
        photo.save(path, format="JPEG", quality=90)
        frame.loc[frame.index[idx], ["image_uri", "updated_at"]] = [str(path.resolve()), stamp]
    for idx in flip:
        frame.loc[frame.index[idx], ["in_stock", "updated_at"]] = [not bool(frame.iloc[idx]["in_stock"]), stamp]
    frame = frame.drop(index=frame.index[sorted(drop)])
    start = 1 + max(int(g[1:]) for g in base["group_id"])
    extra = make_products(start + int(round(new * n)), seed=day + 1000)[start:]
    rows = []
    for i, product in enumerate(extra):
        product = Product(**{**product.__dict__, "group_id": f"P{start + i:05d}"})
        photo = render_photo(product, make_shot(rng, 0), image_size, seed=day * 104729 + i)
        pid = f"{product.group_id}-v0"
        path = out / "images" / f"{pid}.jpg"
        photo.save(path, format="JPEG", quality=90)
        rows.append({"product_id": pid, "image_uri": str(path.resolve()), "category": product.category,
                     "brand": product.brand, "price": product.price, "in_stock": True, "updated_at": stamp,
                     "group_id": product.group_id, "color": product.color, "pattern": product.pattern,
                     "title": f"{product.brand} {product.color} {product.pattern} {product.category}"})
    if rows:
        added = pd.DataFrame(rows)
        added["updated_at"] = pd.to_datetime(added["updated_at"], utc=True).astype("datetime64[us, UTC]")
        frame = pd.concat([frame, added], ignore_index=True)
    frame["updated_at"] = pd.to_datetime(frame["updated_at"], utc=True).astype("datetime64[us, UTC]")
    frame = frame.reset_index(drop=True)
    write_catalog_files(frame, out)
    return frame


def _product_from_row(row) -> Product:
    """Rebuild a product description from its catalog row (pattern details re-drawn deterministically)."""
    rng = np.random.default_rng(int(row["group_id"][1:]))
    secondary = "white" if row["color"] != "white" else "black"
    return Product(group_id=row["group_id"], category=row["category"], color=row["color"], pattern=row["pattern"],
                   secondary=secondary, pattern_scale=float(rng.uniform(0.05, 0.14)), pattern_angle=0,
                   brand=row["brand"], price=float(row["price"]))
