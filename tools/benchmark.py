"""Benchmarks, printed side by side in one run.

    python tools/benchmark.py ops     [options]   # gather-attention kernel vs peers
    python tools/benchmark.py models  [options]   # backbone throughput and memory vs peers
    python tools/benchmark.py dwconv  [options]   # NHWC depthwise-conv kernel vs peers

Each subcommand forwards its options to tools/bench_<name>.py (`--help` lists them).
"""
import importlib
import os
import sys

SUBCOMMANDS = ('ops', 'models', 'dwconv')


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        sys.exit(f'usage: benchmark.py {{{",".join(SUBCOMMANDS)}}} [options]\n{__doc__}')
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    module = importlib.import_module(f'bench_{argv[0]}')
    return module.main(argv[1:])


if __name__ == '__main__':
    main()
