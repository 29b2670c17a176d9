"""Write the synthetic shapes detection dataset (COCO format) used by the demo and the tests.

    python tools/make_demo_data.py data/shapes --num-train 400 --num-val 100 --image-size 160
"""
import argparse

from backbones.datasets import make_shapes_coco


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('root', help='output folder')
    parser.add_argument('--num-train', type=int, default=400, help='training images')
    parser.add_argument('--num-val', type=int, default=100, help='validation images')
    parser.add_argument('--image-size', type=int, default=160, help='image side in pixels')
    parser.add_argument('--max-objects', type=int, default=4, help='shapes per image, at most')
    parser.add_argument('--radius-range', type=float, nargs=2, default=(12.0, 30.0),
                        metavar=('MIN', 'MAX'), help='circumradius of the shapes in pixels')
    parser.add_argument('--seed', type=int, default=0, help='base random seed')
    parser.add_argument('--overwrite', action='store_true',
                        help='render again even when matching files exist')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    paths = make_shapes_coco(
        args.root, num_train=args.num_train, num_val=args.num_val,
        image_size=args.image_size, max_objects=args.max_objects,
        radius_range=tuple(args.radius_range), seed=args.seed, exist_ok=not args.overwrite)
    for split, path in paths.items():
        print(f'{split}: {path}')


if __name__ == '__main__':
    main()
