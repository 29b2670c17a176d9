"""Export a classifier, backbone or detector to ONNX or TensorRT, and verify it.

    python tools/export.py MODEL [--checkpoint CKPT] [--features-only]
                           [--format onnx|tensorrt] [--input-shape B,C,H,W]
                           [--dynamic [batch|hw|all|none]] [--fp16] [--opset N] [--output PATH]

MODEL is a timm model name (e.g. biformer_small; --features-only exports the backbone's
feature maps) or an mmdet config of a single-stage detector (its backbone, neck and head raw
outputs; box decoding and NMS stay outside the graph, see docs/export.md). After export,
onnxruntime (and TensorRT with --format tensorrt) runs the graph at the export shape and at a
second shape exercising the dynamic axes, and the max abs/rel differences to PyTorch are
printed. Exits with status 1 if a max abs difference exceeds --atol + --rtol x the largest
magnitude of that PyTorch output, or the graph has operators TensorRT's ONNX parser does not
support.
"""
import argparse
import sys

from backbones.deploy import DYNAMIC_CHOICES, FORMATS, MIN_OPSET, export_model


def _shape(text: str):
    try:
        shape = tuple(int(part) for part in text.replace('x', ',').split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected B,C,H,W (4 positive ints), got {text!r}')
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f'expected B,C,H,W (4 positive ints), got {text!r}')
    return shape


def _opset(text: str) -> int:
    try:
        opset = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected an int >= {MIN_OPSET}, got {text!r}')
    if opset < MIN_OPSET:
        raise argparse.ArgumentTypeError(f'opset must be >= {MIN_OPSET}, got {opset}')
    return opset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model', help='timm model name or mmdet detector config file')
    parser.add_argument('--checkpoint', help='weights to load (timm: like pretrained weights, '
                        'official BiFormer files included; config: an mmengine checkpoint)')
    parser.add_argument('--features-only', action='store_true',
                        help='timm models: export the backbone feature maps, not the logits')
    parser.add_argument('--format', choices=FORMATS, default='onnx', dest='fmt')
    parser.add_argument('--input-shape', type=_shape, metavar='B,C,H,W',
                        help="default: the timm model's input size with batch 1, or the "
                        "config's test resize scale")
    parser.add_argument('--dynamic', nargs='?', const='all', default='none',
                        choices=DYNAMIC_CHOICES,
                        help='symbolic input axes (bare --dynamic: batch and H/W)')
    parser.add_argument('--fp16', action='store_true',
                        help='TensorRT: allow FP16 kernels (the ONNX graph stays float32)')
    parser.add_argument('--opset', type=_opset, default=MIN_OPSET,
                        help=f'ONNX opset, >= {MIN_OPSET} (default {MIN_OPSET})')
    parser.add_argument('--output', help='output file (default: MODEL.onnx or MODEL.engine)')
    parser.add_argument('--verify-shape', type=_shape, metavar='B,C,H,W',
                        help='second verification shape (default: batch+1 if the batch is '
                        'dynamic, H and W doubled if they are)')
    parser.add_argument('--atol', type=float, default=1e-4,
                        help='allowed max abs difference to PyTorch (default 1e-4) ...')
    parser.add_argument('--rtol', type=float, default=1e-5,
                        help='... plus rtol times the largest magnitude of that PyTorch output '
                        '(default 1e-5)')
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = export_model(args.model, checkpoint=args.checkpoint,
                              features_only=args.features_only, fmt=args.fmt,
                              input_shape=args.input_shape, dynamic=args.dynamic,
                              fp16=args.fp16, opset=args.opset, output=args.output,
                              verify_shape=args.verify_shape)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    failures = report.failures(args.atol, args.rtol)
    for failure in failures:
        print(f'FAILED: {failure}', file=sys.stderr)
    if not failures:
        print(f'OK: every output within atol {args.atol:g} + rtol {args.rtol:g} x its largest '
              f'magnitude of PyTorch; only TensorRT-supported ops')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
