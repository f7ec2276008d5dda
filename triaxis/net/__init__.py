"""The network under a multi-node job: what this node has, what the launcher sets, how fast it is.

    env.py     facts (interfaces, routes, EFA devices) and the environment NCCL/libfabric need
    check.py   `triaxis net check`: preflight, each item pass / warn / fail / skip with its fix
    bench.py   `triaxis net bench`: collective bandwidth with the nccl-tests formulas
    cli.py     the `triaxis net` argument parser
"""
