"""`expanse-fast` on bad arguments, unwritable folders and failing commands: a non-zero exit
status and one line on stderr, never a bare traceback."""
import os
import subprocess
import sys

import pytest

from expanse_fast import cli
from expanse_fast.cli import main


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def _usage_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    return _one_line(err)


@pytest.mark.parametrize("argv,match", [
    (["demo", "--model", "resnet"], "invalid choice: 'resnet'"),
    (["demo", "--target", "far"], "invalid choice: 'far'"),
    (["demo", "--seeds", "0"], "--seeds: must be >= 1, got 0"),
    (["demo", "--seeds", "-3"], "--seeds: must be >= 1, got -3"),
    (["demo", "--seeds", "two"], "--seeds: expected a whole number, got 'two'"),
    (["demo", "--out"], "--out: expected one argument"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["info", "--verbose"], "unrecognized arguments: --verbose"),
    (["bench", "--budget", "nan"], "--budget: must be a finite number >= 0, got nan"),
    (["bench", "--budget", "-5"], "--budget: must be a finite number >= 0, got -5"),
    (["bench", "--budget", "soon"], "--budget: expected a number, got 'soon'"),
])
def test_bad_arguments(argv, match, capsys):
    line = _usage_error(argv, capsys)
    assert line.startswith("expanse-fast") and ": error: " in line and match in line
    assert "--help" in line  # where to look next


def test_every_command_refuses_an_unknown_option(capsys):
    commands = [a for a in cli.build_parser()._subparsers._group_actions[0].choices]
    assert {"info", "demo"} <= set(commands)
    for command in commands:
        line = _usage_error([command, "--no-such-option"], capsys)
        assert "unrecognized arguments: --no-such-option" in line, command


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert "usage: expanse-fast" in out
    assert "choose a command" in _one_line(err)


def test_help_is_not_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    assert "--seeds" in capsys.readouterr().out


@pytest.fixture
def no_demo(monkeypatch):
    """The demo must be refused before it starts (an hour of training, then a crash)."""
    import expanse_fast.demo

    def run_demo(**kw):
        raise AssertionError("the demo started although its output folder is unusable")

    monkeypatch.setattr(expanse_fast.demo, "run_demo", run_demo)


def test_out_under_a_file(tmp_path, capsys, no_demo):
    a_file = tmp_path / "report.json"
    a_file.write_text("{}")
    for out in (a_file, a_file / "sub"):
        assert main(["demo", "--quick", "--out", str(out)]) == 1
        line = _one_line(capsys.readouterr().err)
        assert line.startswith("expanse-fast demo: error: cannot write to the output folder")
        assert str(out) in line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="needs POSIX permissions and a non-root user")
def test_out_read_only(tmp_path, capsys, no_demo):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["demo", "--out", str(ro)]) == 1
        assert "cannot write to the output folder" in _one_line(capsys.readouterr().err)
    finally:
        ro.chmod(0o700)


def test_a_failing_command_is_one_line(monkeypatch, capsys):
    import expanse_fast.demo

    def boom(**kw):
        raise RuntimeError("the kernel\nexploded")

    monkeypatch.setattr(expanse_fast.demo, "run_demo", boom)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert main(["demo", "--out", ""]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("expanse-fast demo: error: RuntimeError: the kernel exploded")
    assert cli.DEBUG_ENV in line
    # asked for: the whole traceback
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(RuntimeError, match="exploded"):
        main(["demo", "--out", ""])


def test_value_errors_read_as_plain_messages(monkeypatch, capsys):
    import expanse_fast.demo

    def bad(**kw):
        raise ValueError("seeds must be >= 1, got 0")

    monkeypatch.setattr(expanse_fast.demo, "run_demo", bad)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert main(["demo", "--out", ""]) == 1
    assert _one_line(capsys.readouterr().err).startswith(
        "expanse-fast demo: error: seeds must be >= 1, got 0 (")


def test_bench_filter_that_matches_nothing(monkeypatch, capsys):
    """Not an empty table and exit 0: the filter is named, with the groups it could match."""
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert main(["bench", "--size", "tiny", "--filter", "no such group", "--quiet"]) == 1
    out, err = capsys.readouterr()
    line = _one_line(err)
    assert out == ""
    assert line.startswith("expanse-fast bench: error: --filter 'no such group' matches no "
                           "group of --size tiny")
    assert "linear" in line and "MLP" in line


def test_bench_save_is_checked_before_the_run(monkeypatch, capsys, tmp_path):
    from expanse_fast import bench

    def never(*args, **kwargs):
        raise AssertionError("the benchmark ran before --save was checked")
    monkeypatch.setattr(bench, "run", never)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    target = a_file / "results.json"  # a folder that cannot exist under a file
    assert main(["bench", "--size", "tiny", "--quiet", "--save", str(target)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"expanse-fast bench: error: --save '{target}': cannot write to")


def test_interrupt(monkeypatch, capsys):
    import expanse_fast.demo

    def interrupted(**kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(expanse_fast.demo, "run_demo", interrupted)
    assert main(["demo", "--out", ""]) == 130
    assert _one_line(capsys.readouterr().err) == "expanse-fast: interrupted"


# ---- the real process: exit status and stderr as a shell sees them -------------------------
def _run(*argv, cwd=None):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop(cli.DEBUG_ENV, None)
    return subprocess.run([sys.executable, "-m", "expanse_fast", *argv], capture_output=True,
                          text=True, timeout=300, env=env, cwd=cwd)


def test_process_bad_argument():
    r = _run("demo", "--model", "resnet")
    assert r.returncode == 2 and r.stdout == ""
    assert "invalid choice: 'resnet'" in _one_line(r.stderr)


def test_process_unwritable_out(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    r = _run("demo", "--quick", "--no-progress", "--out", str(a_file / "out"))
    assert r.returncode == 1 and r.stdout == ""
    assert "cannot write to the output folder" in _one_line(r.stderr)


def test_info_says_how_triton_loads_tiles(monkeypatch):
    # What `expanse-fast info` prints under a usable Triton backend on a GPU.
    import torch
    pytest.importorskip("triton")
    from expanse_fast.kernels import expanded_linear_tma as tma
    monkeypatch.setattr(tma, "MODE", "auto")
    monkeypatch.setattr(tma, "disabled_reason", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert "on for 16-byte aligned" in cli._tma_state(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert "compute capability 8.6 < 9.0" in cli._tma_state(torch.device("cuda"))
    monkeypatch.setattr(tma, "disabled_reason", "forward: CompilationError: boom")
    assert "off (forward: CompilationError: boom)" in cli._tma_state(torch.device("cuda"))
