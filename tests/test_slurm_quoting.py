"""Every value in a generated sbatch script survives quoting: the #SBATCH lines are read back
with sbatch's own rules, the body with the shell's (shlex), and no value can add a line."""

import shlex
import subprocess

import pytest

from tests.parity import tiny_train_args
from triaxis.cli import main
from triaxis.launchers.slurm import SlurmJob, directive_word, render_sbatch


def sbatch_directives(script: str) -> list[str]:
    """The argv sbatch builds from a script's #SBATCH lines: a Python transcription of
    src/sbatch/opt.c (`_opt_batch_script` + `get_argument`, Slurm 20-23). Lines are read until
    the first one that is not blank or a comment; in a #SBATCH line, words split at whitespace,
    a backslash escapes the next character, "..." or '...' group, an unquoted # ends the
    line."""
    argv: list[str] = []
    for line in script.split("\n"):
        if not line.startswith("#SBATCH"):
            if line.strip() and not line.lstrip().startswith("#"):
                break  # the first command: sbatch reads no further
            continue
        assert "hetjob" not in line.lower() and "packjob" not in line.lower(), line
        ptr, n = line[len("#SBATCH") :], 0
        while True:
            while n < len(ptr) and ptr[n].isspace():
                n += 1
            if n >= len(ptr):
                break
            arg, quoted, q, escape = [], False, "", False
            while n < len(ptr) and (quoted or not ptr[n].isspace()):
                c = ptr[n]
                if escape:
                    escape = False
                elif c == "\\":
                    escape, n = True, n + 1
                    continue
                elif quoted:
                    if c == q:
                        quoted, n = False, n + 1
                        continue
                elif c in "\"'":
                    quoted, q, n = True, c, n + 1
                    continue
                elif c == "#":
                    n = len(ptr)
                    break
                arg.append(c)
                n += 1
            assert not quoted, f"sbatch: unmatched quote in {line!r}"
            if arg:
                argv.append("".join(arg))
    return argv


def srun_command(script: str) -> list[str]:
    """The words of the srun line (with its continuation), as bash reads them."""
    lines = script.split("\n")
    i = next(i for i, x in enumerate(lines) if x.startswith("srun "))
    text = lines[i]
    while text.endswith("\\"):
        i += 1
        text = text[:-1] + lines[i]
    return shlex.split(text.rstrip("&"))


HOSTILE = [
    "with space",
    "hash#tag",
    "quote'single",
    'quote"double',
    "back\\slash",
    "ünï €",
    "semi;colon $(rm -rf x) `id` && |",
    "50%j",
    "*glob?[x]",
    "-leading-dash",
    "trail ",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_directive_words_round_trip(value):
    line = f"#SBATCH --comment={directive_word('--comment', value)}"
    if "\\" in value:
        pass  # a backslash is escaped, and comes back
    assert sbatch_directives(line) == [f"--comment={value}"]


@pytest.mark.parametrize("value", HOSTILE)
def test_job_values_survive_the_script(value, tmp_path):
    run_dir = f"/runs/{value}" if "\\" not in value else "/runs/plain"
    job = SlurmJob(
        nnodes=2,
        nproc_per_node=2,
        workdir=f"/work/{value}",
        run_dir=run_dir,
        train_args=[f"/cfg/{value}.toml", f"--train.run_dir={run_dir}"],
        python=f"/venv {value}/python",
        job_name=value,
        partition=value,
        account=value,
        time_limit="1:00:00",
        sbatch_options=[f"--comment={value}"],
    )
    script = render_sbatch(job)
    argv = sbatch_directives(script)
    expect_out = run_dir.replace("%", "%%") + "/slurm-%j.out"
    for want in (
        f"--job-name={value}",
        f"--chdir=/work/{value}",
        f"--output={expect_out}",
        f"--partition={value}",
        f"--account={value}",
        f"--comment={value}",
        "--nodes=2",
        "--requeue",
    ):
        assert want in argv, (want, argv)
    words = srun_command(script)
    assert words[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert words[4] == f"/venv {value}/python"
    assert words[-3:-1] == [f"/cfg/{value}.toml", f"--train.run_dir={run_dir}"]
    path = tmp_path / "s.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


@pytest.mark.parametrize(
    "field,value",
    [
        ("job_name", "a\nsrun rm -rf /"),
        ("partition", "gpu\r"),
        ("account", "x\x00y"),
        ("workdir", "/w/\nexit"),
        ("run_dir", "/r/\x1b[31m"),
        ("python", "/p\n"),
        ("job_name", "my-hetjob"),
        ("run_dir", "/runs/PackJob"),
        ("run_dir", "C:\\runs"),
    ],
)
def test_unsafe_values_are_refused(field, value):
    from triaxis.errors import UserError

    kw = dict(nnodes=1, nproc_per_node=1, workdir="/w", run_dir="/r", train_args=[])
    kw[field] = value
    with pytest.raises(UserError) as e:
        render_sbatch(SlurmJob(**kw))
    assert "\n" not in str(e.value)


def test_train_arg_with_newline_is_refused():
    from triaxis.errors import UserError

    with pytest.raises(UserError, match="control character"):
        render_sbatch(
            SlurmJob(
                nnodes=1,
                nproc_per_node=1,
                workdir="/w",
                run_dir="/r",
                train_args=["--data.path=x\n rm -rf /"],
            )
        )


def test_launch_dry_run_with_hostile_paths(byte_data, tmp_path, capsys):
    run_dir = tmp_path / "my run #1 'q' \"dq\" ü %x"
    args = [
        "launch",
        "--backend",
        "slurm",
        "--nnodes",
        "2",
        "--dry-run",
        "--job-name",
        "a b#c",
        *tiny_train_args(byte_data, run_dir),
    ]
    assert main(args) == 0
    script = capsys.readouterr().out
    argv = sbatch_directives(script)
    assert f"--output={str(run_dir).replace('%', '%%')}/slurm-%j.out" in argv
    assert "--job-name=a b#c" in argv
    assert f"--train.run_dir={run_dir}" in srun_command(script)
    # A newline in any config value never reaches the script: one line, exit 2.
    bad = [
        *args[: -len(tiny_train_args(byte_data, run_dir))],
        *tiny_train_args(byte_data, tmp_path / "x\nsrun evil"),
    ]
    assert main(bad) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "control character" in captured.err


def _string_fields():
    import dataclasses
    import typing

    from triaxis.config import SECTIONS

    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] is str:
                yield f"{section}.{f.name}"


@pytest.mark.parametrize("key", list(_string_fields()))
@pytest.mark.parametrize("ch", ["\n", "\r", "\x00", "\x1b", "\u2028"])
def test_no_config_value_can_add_a_line(key, ch):
    """Every string field of the config refuses control characters at load time: no value
    from a TOML file or the command line reaches a script, a path or a log line with one."""
    from triaxis.config import load_config
    from triaxis.errors import UserError

    with pytest.raises(UserError, match="control character"):
        load_config(None, [f"--{key}=a{ch}srun evil"])


def _real_sbatch_arguments(script_path, tmp_path) -> list[str]:
    """The #SBATCH arguments the installed sbatch itself reads from a script (its debug2 log,
    printed before it tries the controller, which is not there: we stop it then)."""
    import os

    conf = tmp_path / "slurm.conf"
    conf.write_text(
        "ClusterName=t\nSlurmctldHost=localhost\nAuthType=auth/none\n"
        "CredType=cred/none\nNodeName=n0 CPUs=1\nPartitionName=p Nodes=n0\n"
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    proc = subprocess.Popen(
        ["sbatch", "-vvv", str(script_path)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    found = []
    try:
        prefix = 'Found in script, argument "'
        for line in proc.stderr:
            if prefix in line:
                found.append(line.rstrip("\n").split(prefix, 1)[1][:-1])
            elif "end of defined options" in line:
                break  # parsing is over (next it would look for the controller)
    finally:
        proc.kill()
        proc.wait()
    return found


def test_real_sbatch_reads_the_directives_as_we_do(tmp_path):
    """The transcription of sbatch's parser above, checked against the real one (Slurm's
    sbatch, when installed: scripts/ci_services.sh)."""
    import shutil

    if shutil.which("sbatch") is None:
        pytest.skip("sbatch not installed (scripts/ci_services.sh installs Slurm)")
    value = "Ü b#c 'q' \"dq\" \\ %j $(x)"
    job = SlurmJob(
        nnodes=2,
        nproc_per_node=1,
        workdir=f"/work/{value}",
        run_dir=f"/runs/{value.replace(chr(92), '')}",
        train_args=[],
        job_name=value,
        account=value,
        sbatch_options=[f"--comment={v}" for v in HOSTILE],
    )
    script = render_sbatch(job)
    path = tmp_path / "job.sh"
    path.write_text(script)
    real = _real_sbatch_arguments(path, tmp_path)
    assert real == sbatch_directives(script)
    assert f"--job-name={value}" in real and f"--chdir=/work/{value}" in real
    assert [a for a in real if a.startswith("--comment=")] == [f"--comment={v}" for v in HOSTILE]
