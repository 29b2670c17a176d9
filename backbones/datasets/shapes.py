"""A deterministic synthetic detection dataset in COCO format: shapes on textured backgrounds.

Every image is rendered from its own seed (``seed``, split and index), so the same arguments
always give byte-identical files, and adding images never changes the existing ones. Objects
are filled polygons (circles are 48-gons) that never overlap, so each polygon is the exact
instance mask; boxes are the polygon extents in COCO ``[x, y, w, h]`` form and areas are the
polygon areas, as pycocotools computes them.

Layout written under ``root``::

    root/train/000000.png ...
    root/val/000000.png ...
    root/annotations/instances_train.json
    root/annotations/instances_val.json
"""
import json
import math
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ('circle', 'square', 'triangle', 'star')
PALETTE = [(220, 20, 60), (0, 128, 255), (60, 179, 113), (255, 165, 0)]
METAINFO = dict(classes=CLASSES, palette=PALETTE)
SPLITS = ('train', 'val')
_SPLIT_SEED_OFFSET = {'train': 0, 'val': 1}
_FORMAT_VERSION = 1


def annotation_path(root: str, split: str) -> str:
    """Path of the COCO json of ``split`` ('train' or 'val') under ``root``."""
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    return os.path.join(root, 'annotations', f'instances_{split}.json')


def _shape_polygon(name: str, center: Tuple[float, float], radius: float,
                   angle: float) -> np.ndarray:
    """Vertices (V, 2) in pixel coordinates of shape ``name`` inscribed in a circle."""
    if name == 'circle':
        thetas = np.linspace(0.0, 2 * math.pi, 48, endpoint=False)
        radii = np.full_like(thetas, radius)
    elif name == 'square':
        thetas = angle + np.arange(4) * (math.pi / 2)
        radii = np.full(4, radius)
    elif name == 'triangle':
        thetas = angle + np.arange(3) * (2 * math.pi / 3)
        radii = np.full(3, radius)
    elif name == 'star':
        thetas = angle + np.arange(10) * (math.pi / 5)
        radii = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
    else:
        raise ValueError(f'unknown shape {name!r}; expected one of {CLASSES}')
    return np.stack([center[0] + radii * np.cos(thetas),
                     center[1] + radii * np.sin(thetas)], axis=1)


def _polygon_area(vertices: np.ndarray) -> float:
    x, y = vertices[:, 0], vertices[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _textured_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32 in [0, 1]: smooth colour blobs, oriented stripes, fine noise."""
    grid = int(rng.integers(3, 8))
    coarse = (rng.uniform(0.15, 0.85, (grid, grid, 3)) * 255).astype(np.uint8)
    blobs = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC),
                       dtype=np.float32) / 255.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(6.0, 24.0)
    phase = (xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period)
    stripes = rng.uniform(0.03, 0.12) * np.sin(phase)[..., None]
    noise = rng.normal(0.0, 0.03, (size, size, 3)).astype(np.float32)
    return np.clip(blobs + stripes + noise, 0.0, 1.0)


def _contrasting_color(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """An RGB colour in [0, 1] whose luminance differs from ``background``'s mean by >= 0.25."""
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    target = float(background.reshape(-1, 3).mean(0) @ weights)
    for _ in range(32):
        color = rng.uniform(0.0, 1.0, 3).astype(np.float32)
        if abs(float(color @ weights) - target) >= 0.25:
            return color
    return np.full(3, 0.0 if target > 0.5 else 1.0, dtype=np.float32)


def render_image(rng: np.random.Generator, image_size: int, max_objects: int,
                 radius_range: Tuple[float, float]) -> Tuple[np.ndarray, List[dict]]:
    """Render one image with 1..``max_objects`` non-overlapping shapes.

    Returns:
        image: (image_size, image_size, 3) uint8 RGB.
        objects: dicts with ``category_id`` (1-based index into CLASSES), ``polygon`` (V, 2)
        float vertices, ``bbox`` [x, y, w, h] and ``area`` (polygon area).
    """
    image = _textured_background(rng, image_size)
    num_objects = int(rng.integers(1, max_objects + 1))
    placed: List[Tuple[float, float, float]] = []
    objects = []
    for _ in range(num_objects):
        for _attempt in range(50):
            radius = float(rng.uniform(*radius_range))
            cx, cy = rng.uniform(radius + 1, image_size - radius - 1, 2)
            if all(math.hypot(cx - px, cy - py) > radius + pr + 2 for px, py, pr in placed):
                break
        else:
            continue  # no free spot left for this object
        placed.append((cx, cy, radius))
        label = int(rng.integers(len(CLASSES)))
        polygon = _shape_polygon(CLASSES[label], (cx, cy), radius, rng.uniform(0, 2 * math.pi))
        x0, y0 = polygon.min(0)
        x1, y1 = polygon.max(0)
        left, top = int(x0), int(y0)
        right, bottom = min(int(x1) + 2, image_size), min(int(y1) + 2, image_size)
        mask_image = Image.new('L', (right - left, bottom - top), 0)
        ImageDraw.Draw(mask_image).polygon(
            [(x - left, y - top) for x, y in polygon.tolist()], fill=255)
        mask = np.asarray(mask_image, dtype=np.float32)[..., None] / 255.0
        crop = image[top:bottom, left:right]
        inside = crop[mask[..., 0] > 0.5]
        color = _contrasting_color(rng, inside if inside.size else crop)
        shading = 1.0 + rng.normal(0.0, 0.04, mask.shape).astype(np.float32)
        image[top:bottom, left:right] = (
            crop * (1.0 - mask) + np.clip(color * shading, 0.0, 1.0) * mask)
        objects.append(dict(category_id=label + 1, polygon=polygon,
                            bbox=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                            area=_polygon_area(polygon)))
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), objects


def _check_args(num_images: Dict[str, int], image_size: int, max_objects: int,
                radius_range: Sequence[float]) -> Tuple[float, float]:
    for split, count in num_images.items():
        if not isinstance(count, int) or count < 0:
            raise ValueError(f'num_{split} must be an int >= 0, got {count!r}')
    if not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f'image_size must be an int >= 32, got {image_size!r}')
    if not isinstance(max_objects, int) or max_objects < 1:
        raise ValueError(f'max_objects must be an int >= 1, got {max_objects!r}')
    if len(radius_range) != 2:
        raise ValueError(f'radius_range must be (min, max), got {radius_range!r}')
    low, high = float(radius_range[0]), float(radius_range[1])
    if not 2.0 <= low <= high < image_size / 2 - 1:
        raise ValueError('radius_range must satisfy 2 <= min <= max < image_size / 2 - 1, '
                         f'got {radius_range!r} for image_size={image_size}')
    return low, high


def make_shapes_coco(root: str, num_train: int = 400, num_val: int = 100,
                     image_size: int = 160, max_objects: int = 4,
                     radius_range: Sequence[float] = (12.0, 30.0), seed: int = 0,
                     exist_ok: bool = True) -> Dict[str, str]:
    """Write the shapes dataset under ``root``; return ``{split: annotation json path}``.

    Args:
        root: output folder (created if missing).
        num_train, num_val: number of images per split (0 gives a valid empty split).
        image_size: side of the square images in pixels (>= 32).
        max_objects: each image holds 1..max_objects shapes (fewer if they do not fit).
        radius_range: (min, max) circumradius of the shapes in pixels.
        seed: base seed; image ``i`` of a split uses ``(seed, split, i)``.
        exist_ok: when both json files exist and were written with the same arguments,
            return them without rendering again.
    """
    num_images = dict(train=num_train, val=num_val)
    low, high = _check_args(num_images, image_size, max_objects, radius_range)
    params = dict(format_version=_FORMAT_VERSION, num_train=num_train, num_val=num_val,
                  image_size=image_size, max_objects=max_objects,
                  radius_range=[low, high], seed=seed)
    paths = {split: annotation_path(root, split) for split in SPLITS}
    if exist_ok and all(_is_complete(root, split, paths[split], params) for split in SPLITS):
        return paths
    os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
    categories = [dict(id=i + 1, name=name, supercategory='shape')
                  for i, name in enumerate(CLASSES)]
    for split in SPLITS:
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, annotations = [], []
        for index in range(num_images[split]):
            rng = np.random.default_rng([seed, _SPLIT_SEED_OFFSET[split], index])
            pixels, objects = render_image(rng, image_size, max_objects, (low, high))
            file_name = f'{index:06d}.png'
            Image.fromarray(pixels).save(os.path.join(root, split, file_name))
            images.append(dict(id=index + 1, file_name=file_name,
                               width=image_size, height=image_size))
            for obj in objects:
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=index + 1,
                    category_id=obj['category_id'], iscrowd=0,
                    bbox=[round(v, 2) for v in obj['bbox']], area=round(obj['area'], 2),
                    segmentation=[[round(v, 2) for v in obj['polygon'].reshape(-1).tolist()]]))
        coco = dict(info=dict(description='dsa-backbones synthetic shapes', params=params),
                    images=images, annotations=annotations, categories=categories)
        with open(paths[split], 'w') as f:
            json.dump(coco, f)
    return paths


def _is_complete(root: str, split: str, path: str, params: dict) -> bool:
    """True when ``path`` was written with ``params`` and all its images are on disk."""
    try:
        with open(path) as f:
            coco = json.load(f)
    except (OSError, ValueError):
        return False
    return (coco.get('info', {}).get('params') == params and all(
        os.path.isfile(os.path.join(root, split, image['file_name']))
        for image in coco.get('images', [])))
