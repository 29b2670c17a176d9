"""Benchmarks, printed side by side in one run.

    python tools/benchmark.py ops     [options]   # gather-attention kernel vs peers
    python tools/benchmark.py models  [options]   # backbone throughput and memory vs peers
    python tools/benchmark.py dwconv  [options]   # NHWC depthwise-conv kernel vs peers
    python tools/benchmark.py layernorm [options] # LayerNorm kernel vs native and compiled
    python tools/benchmark.py mlp     [options]   # fused LayerNorm-MLP forward vs its launches
    python tools/benchmark.py overhead [options]  # host time per op call, ours vs PyTorch's
    python tools/benchmark.py colsum  [options]   # bias-gradient column sums vs sum(0)

Each subcommand forwards its options to its tools/bench_*.py module (`--help` lists them).
"""
import importlib
import os
import sys

MODULES = {'ops': 'bench_ops', 'models': 'bench_models', 'dwconv': 'bench_dwconv',
           'layernorm': 'bench_layer_norm', 'mlp': 'bench_mlp', 'overhead': 'bench_overhead',
           'colsum': 'bench_column_sum'}
SUBCOMMANDS = tuple(MODULES)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        sys.exit(f'usage: benchmark.py {{{",".join(SUBCOMMANDS)}}} [options]\n{__doc__}')
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    module = importlib.import_module(MODULES[argv[0]])
    return module.main(argv[1:])


if __name__ == '__main__':
    main()
