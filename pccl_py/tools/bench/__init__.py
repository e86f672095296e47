"""All-reduce benchmark (`pccl bench`); the code is in pccl_py.tools.bench.harness."""

from pccl_py.tools.bench.harness import (
    BenchConfig,
    BenchError,
    PcclParams,
    Result,
    add_arguments,
    bus_factor,
    config_from_args,
    default_iters,
    default_warmup,
    format_size,
    main,
    parse_size,
    results_table,
    run_benchmark,
)

__all__ = [
    "BenchConfig",
    "BenchError",
    "PcclParams",
    "Result",
    "add_arguments",
    "bus_factor",
    "config_from_args",
    "default_iters",
    "default_warmup",
    "format_size",
    "main",
    "parse_size",
    "results_table",
    "run_benchmark",
]
