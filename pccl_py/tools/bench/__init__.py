"""All-reduce benchmark (`pccl bench`): pccl's native ring against torch.distributed's
gloo, on loopback or across network namespaces with shaped links.

    config    what one invocation measures (BenchConfig), defaults, byte sizes
    backends  the implementations a worker runs: pccl engine, Communicator, gloo
    worker    one worker process: its command loop and the parent<->worker messages
    harness   the driver: worker groups, sizes, rounds, namespaces -> Results
    report    Result, the table, progress and JSON lines

The command line (`pccl bench`) lives in pccl_py.cli.bench.

With --quantization, every pccl variant is also measured quantized (same engines, same
buffers, back to back). Its algbw is the *effective* one: the original float32 bytes
over the time, so it compares directly with the unquantized run; the table shows the
ratio. The verification op stays exact: constant blocks quantize without error.
"""

from pccl_py.tools.bench.config import (
    BenchConfig,
    BenchError,
    PcclParams,
    default_iters,
    default_warmup,
    format_size,
    parse_size,
)
from pccl_py.tools.bench.harness import run_benchmark
from pccl_py.tools.bench.report import Result, bus_factor, results_table

__all__ = [
    "BenchConfig",
    "BenchError",
    "PcclParams",
    "Result",
    "bus_factor",
    "default_iters",
    "default_warmup",
    "format_size",
    "parse_size",
    "results_table",
    "run_benchmark",
]
