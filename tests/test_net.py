"""`triaxis net`: nccl-tests bandwidth arithmetic, the preflight's judgement of an EFA node and of
this CPU machine, and a real 2-process gloo benchmark whose JSON the planner loads."""

import json
from pathlib import Path

import pytest

from tests.helpers import triaxis
from triaxis.errors import UserError
from triaxis.launchers.netenv import apply_env, recommended_env
from triaxis.net import bench
from triaxis.net.check import NetFacts, evaluate, gather

# -- bandwidth arithmetic: nccl-tests' doc/PERFORMANCE.md --------------------------------------


@pytest.mark.parametrize(
    "n, all_reduce, gather_like",
    [(2, 1.0, 0.5), (4, 1.5, 0.75), (8, 1.75, 0.875), (16, 1.875, 0.9375)],
)
def test_bus_factors_are_the_nccl_tests_formulas(n, all_reduce, gather_like):
    assert bench.bus_factor("all_reduce", n) == pytest.approx(all_reduce)
    for op in ("all_gather", "reduce_scatter", "all_to_all"):
        assert bench.bus_factor(op, n) == pytest.approx(gather_like)
    assert bench.bus_factor("broadcast", n) == 1.0
    with pytest.raises(ValueError):
        bench.bus_factor("gather", n)


def test_row_arithmetic():
    # 256 Mi floats (1 GiB) all-reduced over 8 ranks in 10 ms: algbw = 2^30 B / 0.01 s.
    row = bench.make_row("all_reduce", 2**28, 4, 0.010, 8)
    assert row.size_bytes == 2**30 and row.time_us == pytest.approx(10_000)
    assert row.algbw_gbps == pytest.approx(107.3741824)
    assert row.busbw_gbps == pytest.approx(107.3741824 * 1.75)
    assert bench.make_row("broadcast", 1024, 4, 1e-3, 8).busbw_gbps == pytest.approx(0.004096)


def test_sizes_and_their_errors():
    assert bench.message_sizes(1024, 8192) == [1024, 2048, 4096, 8192]
    assert bench.message_sizes(bench.parse_size("1K"), bench.parse_size("1G"))[-1] == 2**30
    assert len(bench.message_sizes(1024, 2**30)) == 21
    assert bench.parse_size("16MiB") == 16 * 2**20 and bench.parse_size("4096") == 4096
    with pytest.raises(UserError, match="not a byte count"):
        bench.parse_size("lots")
    with pytest.raises(UserError, match="above --max-bytes"):
        bench.message_sizes(4096, 1024)


def test_planner_fields_from_measurements():
    report = {
        "world_size": 4,
        "nnodes": 2,
        "results": [
            {"op": "all_reduce", "size_bytes": 1024, "time_us": 60.0, "busbw_gbps": 0.1},
            {"op": "all_reduce", "size_bytes": 2**30, "time_us": 5e4, "busbw_gbps": 40.0},
        ],
    }
    fields = bench.planner_fields(report)
    assert fields["link"] == "inter_node"
    assert fields["cluster_fields"] == {
        "network_gbit": 320.0,
        "network_efficiency": 1.0,
        "network_latency_us": 10.0,
    }


# -- preflight ---------------------------------------------------------------------------------


def _fake_efa_node(tmp_path: Path) -> dict:
    """sysfs with two EFA devices, a fi_info that lists them, nvidia_peermem, the plugin."""
    drivers = tmp_path / "bus/pci/drivers/efa"
    drivers.mkdir(parents=True)
    for dev in ("rdmap16s27", "rdmap32s27"):
        (tmp_path / "ib" / dev / "device").mkdir(parents=True)
        (tmp_path / "ib" / dev / "device" / "driver").symlink_to(drivers)
    (tmp_path / "ib" / "mlx5_0" / "device").mkdir(parents=True)  # not EFA: ignored
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fi_info = bin_dir / "fi_info"
    fi_info.write_text(
        '#!/bin/sh\n[ "$1 $2" = "-p efa" ] || exit 61\n'
        "for d in rdmap16s27 rdmap32s27; do\n"
        '  printf "provider: efa\\n    fabric: efa\\n    domain: %s-rdm\\n" $d\n'
        "done\n"
    )
    fi_info.chmod(0o755)
    plugin_dir = tmp_path / "ofi"
    plugin_dir.mkdir()
    (plugin_dir / "libnccl-net-ofi.so").write_bytes(b"")
    modules = tmp_path / "modules"
    modules.write_text("nvidia_peermem 16384 0 - Live 0x0\nefa 147456 0 - Live 0x0\n")
    return {
        "sysfs": tmp_path / "ib",
        "modules": modules,
        "environ": {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "LD_LIBRARY_PATH": str(plugin_dir),
            "FI_PROVIDER": "tcp",
        },
    }


def test_gather_reads_an_efa_node(tmp_path):
    f = gather(**_fake_efa_node(tmp_path))
    assert f.efa_devices == ["rdmap16s27", "rdmap32s27"]
    assert f.fi_info_efa is not None and f.fi_info_efa[0] == 0
    assert f.ofi_nccl_plugin.endswith("libnccl-net-ofi.so") and f.peermem_loaded
    f.gpus, f.nccl_version, f.libfabric = 8, "2.21.5", "/opt/amazon/efa/lib/libfabric.so.1"
    status = {c.name: c for c in evaluate(f)}
    for name in (
        "efa devices",
        "fi_info -p efa",
        "libfabric",
        "aws-ofi-nccl",
        "gpudirect rdma",
        "nccl",
        "env FI_EFA_USE_DEVICE_RDMA",
    ):
        assert status[name].status == "pass", status[name]
    assert "2 endpoint(s)" in status["fi_info -p efa"].detail
    # The user's FI_PROVIDER=tcp is kept, but flagged with the fix.
    assert (
        status["env FI_PROVIDER"].status == "warn"
        and "unset FI_PROVIDER" in status["env FI_PROVIDER"].fix
    )


def test_an_efa_node_missing_its_software_fails_with_fixes():
    f = NetFacts(
        efa_devices=["rdmap16s27"],
        gpus=8,
        nccl_version="2.21.5",
        interface="ens32",
        environ={"NCCL_NET": "Socket"},
    )
    status = {c.name: c for c in evaluate(f)}
    assert (
        status["fi_info -p efa"].status == "fail"
        and "aws-efa-installer" in status["fi_info -p efa"].fix
    )
    assert (
        status["aws-ofi-nccl"].status == "fail" and "LD_LIBRARY_PATH" in status["aws-ofi-nccl"].fix
    )
    assert (
        status["gpudirect rdma"].status == "fail"
        and "modprobe nvidia_peermem" in status["gpudirect rdma"].fix
    )
    assert status["env NCCL_NET"].status == "fail"


def test_recommended_env_is_applied_without_overriding_the_user():
    env = {"NCCL_SOCKET_IFNAME": "ens5"}
    applied, kept = apply_env(recommended_env(efa=True, gpus=True, ifname="eth0"), env)
    assert applied == {
        "GLOO_SOCKET_IFNAME": "eth0",
        "FI_PROVIDER": "efa",
        "FI_EFA_FORK_SAFE": "1",
        "FI_EFA_USE_DEVICE_RDMA": "1",
    }
    assert kept == {"NCCL_SOCKET_IFNAME": "ens5"} and env["NCCL_SOCKET_IFNAME"] == "ens5"
    assert [v.name for v in recommended_env(efa=False, gpus=False, ifname=None)] == []


def test_net_check_on_this_cpu_machine():
    proc = triaxis("net", "check", timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "[skip] nccl" in proc.stdout
    assert ", 0 fail," in proc.stdout


def test_net_check_json(capsys):
    from triaxis.cli import main

    assert main(["net", "check", "--json"]) == 0
    checks = json.loads(capsys.readouterr().out)
    assert {c["status"] for c in checks} <= {"pass", "warn", "skip"}
    assert {"efa devices", "aws-ofi-nccl", "gpudirect rdma", "nccl"} <= {c["name"] for c in checks}


# -- the benchmark itself ----------------------------------------------------------------------


@pytest.mark.slow
def test_net_bench_two_processes_gloo(tmp_path):
    out, hw = tmp_path / "bench.json", tmp_path / "measured.toml"
    proc = triaxis(
        "net",
        "bench",
        "--nproc-per-node",
        2,
        "--max-bytes",
        "64K",
        "--iters",
        3,
        "--warmup",
        1,
        "--json",
        out,
        "--hardware-out",
        hw,
        "--base-cluster",
        "cpu",
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "busbw(GB/s)" in lines[2]
    rows = [ln.split() for ln in lines[3:-1]]
    assert len(rows) == 5 * 7  # five collectives x (1K .. 64K)
    report = json.loads(out.read_text())
    assert report["schema"] == "triaxis.net.bench/1" and report["world_size"] == 2
    assert report["backend"] == "gloo" and report["nnodes"] == 1
    for r, row in zip(report["results"], rows):
        assert row[0] == r["op"] and int(row[1]) == r["size_bytes"]
        assert r["count"] * 4 == r["size_bytes"] and r["time_us"] > 0
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * bench.bus_factor(r["op"], 2))
        assert r["algbw_gbps"] == pytest.approx(r["size_bytes"] / r["time_us"] / 1e3)
    # The planner takes the measured figures as a cluster profile.
    from triaxis.plan.hardware import load_catalog, resolve_hardware

    hw_profile = resolve_hardware(load_catalog(hw), None, "cpu-measured")
    measured = report["planner"]["cluster_fields"]["nvlink_busbw_gbps"]
    assert hw_profile.cluster.nvlink_bytes_per_s == pytest.approx(measured * 1e9)
    assert measured == pytest.approx(report["peak_busbw_gbps"]["all_reduce"], abs=1e-3)


def test_net_bench_bad_input_is_one_line(capsys):
    from triaxis.cli import main

    for args, msg in (
        (["--ops", "all_reduce,gather"], "--ops gather unknown"),
        (["--nproc-per-node", "1"], "one process measures no collective"),
        (["--max-bytes", "lots"], "not a byte count"),
    ):
        assert main(["net", "bench", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and msg in err[0], err
