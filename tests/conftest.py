import os

import pytest
import torch

# One S3 server for the whole session, defined here once: a module importing the fixture would
# define its own, and each of those servers (17 modules) started and stopped on its own.
from tests.s3_server import moto_s3  # noqa: F401

# Forked workers hang when the parent already spun up several OpenMP threads (shared notes).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory) -> str:
    """A small prepared corpus with the byte tokenizer (no BPE training: fast)."""
    from triaxis.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("byte_data")
    prepare(
        PrepareOptions(
            inputs=[],
            output=str(out),
            tokenizer="byte",
            max_bytes=400_000,
            val_fraction=0.1,
            shard_tokens=60_000,
        ),
        log=lambda *_: None,
    )
    return str(out)


@pytest.fixture(autouse=True)
def _restore_environ():
    """The launcher sets its network variables in os.environ (for its workers); in-process CLI
    calls must not leak them into later tests' subprocesses."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# The fast lane (`-m "not slow"`) keeps one representative of each feature and layer; these
# cases take the same path through another door, so they run in the full suite only. Each entry
# names what covers its path in the fast lane. (Measured on the quiet 2-core machine: together
# ~60 s of the fast lane's ~4.5 minutes.)
FULL_SUITE_ONLY = {
    "test_pipeline_parity.py::test_schedule_matches_single_process[interleaved-1f1b-2]": "[1f1b-2]",
    "test_pipeline_parity.py::test_schedule_matches_single_process[dualpipev-2]": "[zbv-2]",
    "test_pipeline_parity.py::test_schedule_matches_single_process[interleaved-zb-2]": "[zbv-2]",
    "test_pipeline_parity.py::test_schedule_matches_single_process[looped-bfs-2]": "[1f1b-2]",
    "test_pipeline_parity.py::test_schedule_matches_single_process[gpipe-2]": "[1f1b-2]",
    "test_parallel_parity.py::test_layout_matches_single_process[tp2-no_accum]": "[tp2-accum2]",
    "test_parallel_parity.py::test_layout_matches_single_process[dp_shard2-no_accum]": (
        "[dp_shard2-accum2]"
    ),
    "test_parallel_parity.py::test_layout_matches_single_process[dp_replicate2-accum2]": (
        "test_mics_schedule.py::test_two_hop_sync_hsdp[1]"
    ),
    "test_parallel_parity.py::test_layout_matches_single_process[dp_replicate2-no_accum]": (
        "test_mics_schedule.py::test_two_hop_sync_hsdp[1]"
    ),
    "test_parallel_parity.py::test_variant_matches_single_process[loss_parallel]": (
        "test_cp_parity.py (cp2_tp2_loss_parallel) and test_composition.py, full suite; the "
        "tp path: [tp2-accum2]"
    ),
    "test_parallel_parity.py::test_variant_matches_single_process[zero2_no_reshard]": (
        "[cpu_offload], [full_ac]: the same FSDP wrapping"
    ),
    "test_lora.py::test_lora_layout_matches_single_process[tp2]": "[dp_shard2]",
    "test_lora.py::test_lora_layout_matches_single_process[pp2]": "[dp_shard2]",
    "test_expert_parallel.py::test_expert_parallel_matches_single_process[ep2_full_ac]": "[ep2]",
    "test_plan_runs.py::test_every_enumerated_layout_passes_the_trainers_rules[4]": "[2]",
    "test_mics_schedule.py::test_two_hop_sync_hsdp[3]": "[1]",
    "test_document_mask.py::test_packed_window_equals_documents_alone_in_parallel[tp2]": (
        "[dp_shard2]"
    ),
    "test_chat.py::test_masked_loss_under_dp_shard_matches_one_process[dp_shard2_accum2]": (
        "[dp_shard2_full_logits]"
    ),
    "test_launch_sagemaker.py::test_sagemaker_job_goes_through_moto[flag]": "[config]",
    "test_checkpoint.py::test_numerics_guard[rollback]": (
        "test_resilience_matrix.py::test_matrix[dp_shard-rollback-kill]"
    ),
    "test_float8_compose.py::test_float8_pp_1f1b_matches_one_process_with_the_same_micro_batches": (
        "test_float8.py::test_float8_layouts_match_one_process[dp_shard2]"
    ),
    "test_user_os_errors.py::test_user_os_error_is_one_line_alone_and_launched"
    "[read-only run_dir-one process]": "test_bad_input.py::test_full_disk_is_one_line",
    "test_plan_float8.py::test_cli_float8_auto_turns_it_on_where_it_pays_and_says_why": (
        "test_float8_auto.py (plan_for_world with train.float8=auto)"
    ),
    "test_data_remote.py::test_shard_groups_make_a_small_cache_enough": (
        "test_cache_is_bounded_least_recently_used_out"
    ),
    "test_checkpoint_safety.py::test_manifest_names_outside_the_folder_make_it_invalid[outside]": (
        "test_crafted_metadata_pickle_runs_nothing[resume] (the same resume path)"
    ),
    "test_checkpoint_safety.py::test_a_shard_failing_its_checksum_is_refused[generate]": (
        "test_items_are_verified_in_the_read_that_loads_them"
    ),
}


def pytest_collection_modifyitems(config, items):
    seen = {item.nodeid.removeprefix("tests/") for item in items}
    files = {nodeid.split("::")[0] for nodeid in seen}
    # A renamed test would silently come back into the fast lane: an entry whose file was
    # collected whole must name a collected test (a -k or ::name selection is not whole).
    if not config.option.keyword and all("::" not in a for a in config.args):
        stale = [n for n in FULL_SUITE_ONLY if n.split("::")[0] in files and n not in seen]
        if stale:
            raise pytest.UsageError(f"tests/conftest.py FULL_SUITE_ONLY names no test: {stale}")
    for item in items:
        if item.nodeid.removeprefix("tests/") in FULL_SUITE_ONLY:
            item.add_marker(pytest.mark.slow)
