"""The synthetic shapes dataset: deterministic, valid COCO, exact masks, clear argument errors."""
import json
import os

import numpy as np
import pytest

from backbones.datasets import CLASSES, annotation_path, make_shapes_coco, render_image

SMALL = dict(num_train=3, num_val=2, image_size=64, max_objects=3, radius_range=(6, 12))


def _files(root):
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_same_arguments_give_identical_files(tmp_path):
    make_shapes_coco(str(tmp_path / 'a'), **SMALL)
    make_shapes_coco(str(tmp_path / 'b'), **SMALL)
    files_a, files_b = _files(tmp_path / 'a'), _files(tmp_path / 'b')
    assert sorted(files_a) == sorted(
        ['annotations/instances_train.json', 'annotations/instances_val.json',
         'train/000000.png', 'train/000001.png', 'train/000002.png',
         'val/000000.png', 'val/000001.png'])
    assert files_a == files_b


def test_more_images_keep_existing_ones_and_seed_changes_them(tmp_path):
    make_shapes_coco(str(tmp_path / 'a'), **SMALL)
    make_shapes_coco(str(tmp_path / 'b'), **dict(SMALL, num_train=5))
    make_shapes_coco(str(tmp_path / 'c'), **dict(SMALL, seed=1))
    a, b, c = (_files(tmp_path / n) for n in 'abc')
    assert a['train/000002.png'] == b['train/000002.png']
    assert a['val/000001.png'] == b['val/000001.png']
    assert a['train/000000.png'] != c['train/000000.png']


def test_annotations_are_valid_coco_with_exact_masks(tmp_path):
    from pycocotools.coco import COCO
    paths = make_shapes_coco(str(tmp_path), **dict(SMALL, num_train=6))
    coco = COCO(paths['train'])
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    assert len(coco.getImgIds()) == 6
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert 1 <= len(anns) <= SMALL['max_objects']
        union = np.zeros((64, 64), dtype=np.int64)
        for ann in anns:
            x, y, w, h = ann['bbox']
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w > 0 and h > 0
            mask = coco.annToMask(ann)
            ys, xs = np.nonzero(mask)
            # The rasterised mask fills the box (to 1.5 px at sharp vertices) and matches
            # the polygon area.
            assert abs(xs.min() - x) <= 1.5 and abs(xs.max() + 1 - (x + w)) <= 1.5
            assert abs(ys.min() - y) <= 1.5 and abs(ys.max() + 1 - (y + h)) <= 1.5
            assert abs(mask.sum() - ann['area']) <= 0.2 * ann['area']
            union += mask
        assert union.max() == 1, 'objects must not overlap'


def test_render_image_paints_the_shapes():
    image, objects = render_image(np.random.default_rng(0), 96, 4, (10.0, 20.0))
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    weights = np.array([0.299, 0.587, 0.114])
    for obj in objects:
        x, y, w, h = (int(round(v)) for v in obj['bbox'])
        cx, cy = x + w // 2, y + h // 2
        centre = image[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0) @ weights
        ring = np.concatenate([image[max(y - 3, 0), x:x + w], image[min(y + h + 2, 95), x:x + w]])
        assert abs(centre - (ring.mean(0) @ weights)) > 20


def test_empty_split_and_reuse_of_existing_files(tmp_path):
    paths = make_shapes_coco(str(tmp_path), **dict(SMALL, num_val=0))
    with open(paths['val']) as f:
        val = json.load(f)
    assert val['images'] == [] and val['annotations'] == [] and len(val['categories']) == 4
    stamp = os.path.getmtime(paths['train'])
    assert make_shapes_coco(str(tmp_path), **dict(SMALL, num_val=0)) == paths
    assert os.path.getmtime(paths['train']) == stamp
    os.remove(tmp_path / 'train' / '000001.png')
    make_shapes_coco(str(tmp_path), **dict(SMALL, num_val=0))
    assert (tmp_path / 'train' / '000001.png').is_file()


@pytest.mark.parametrize('kwargs, name', [
    (dict(num_train=-1), 'num_train'),
    (dict(num_val=1.5), 'num_val'),
    (dict(image_size=16), 'image_size'),
    (dict(max_objects=0), 'max_objects'),
    (dict(radius_range=(5,)), 'radius_range'),
    (dict(radius_range=(12, 6)), 'radius_range'),
    (dict(radius_range=(6, 40)), 'radius_range'),
])
def test_bad_arguments_name_themselves(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_shapes_coco(str(tmp_path), **dict(SMALL, **kwargs))
    with pytest.raises(ValueError, match='split'):
        annotation_path(str(tmp_path), 'test')
