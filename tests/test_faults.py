"""The test fault hooks are parsed once, when the Trainer starts, not on every step."""

import pytest

from triaxis.train.resilience import Faults, InjectedFault


def test_faults_parsed_once_and_first_attempt_only(monkeypatch):
    env = {
        "TRIAXIS_FAULT_KILL": "1:4",
        "TRIAXIS_FAULT_NAN": "3",
        "TRIAXIS_FAULT_ERROR": "0:forward@2",
        "TRIAXIS_FAULT_STEP_DELAY_S": "0.5",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    faults = Faults()
    assert faults.kill == {4: 1} and faults.step_delay_s == 0.5
    monkeypatch.delenv("TRIAXIS_FAULT_NAN")
    monkeypatch.delenv("TRIAXIS_FAULT_ERROR")
    monkeypatch.delenv("TRIAXIS_FAULT_STEP_DELAY_S")  # read at start: later changes don't count
    assert not faults.inject_nan(2)
    assert faults.inject_nan(3) and not faults.inject_nan(3)  # the first time only
    faults.step_delay_s = 0.0
    faults.inject_fault("forward", 0, 1)  # before its step: nothing
    faults.inject_fault("forward", 1, 2)  # another rank: nothing
    with pytest.raises(InjectedFault, match="forward, step 2, rank 0"):
        faults.inject_fault("forward", 0, 2)
    faults.inject_fault("forward", 0, 3)  # once

    # A restarted elastic attempt recovers: no kill or error, but NaN poisoning still applies.
    restarted = Faults({**env, "TORCHELASTIC_RESTART_COUNT": "1"})
    assert restarted.kill == {} and restarted.points == {} and restarted.nan_steps == {3}
