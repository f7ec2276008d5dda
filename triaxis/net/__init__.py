"""The network under a multi-node job: what this node has, what the launcher sets, how fast it is.

    check.py   `triaxis net check`: preflight, each item pass / warn / fail / skip with its fix
    bench.py   `triaxis net bench`: collective bandwidth with the nccl-tests formulas
    cli.py     the `triaxis net` argument parser

The network facts and the environment the launcher sets live in triaxis/launchers/netenv.py
(the launcher needs them; `triaxis net` sits above it and reads them from there).
"""
