"""python -m amos_fused.bench_fsdp refuses bad options as argparse does (exit 2, one
line naming the option) before anything is spawned or timed."""
import re

import pytest

from amos_fused import bench_fsdp


@pytest.mark.parametrize("argv,match", [
    (["--ranks", "0"], "--ranks, --rounds and --steps must be >= 1"),
    (["--rounds", "0"], "--ranks, --rounds and --steps must be >= 1"),
    (["--steps", "0"], "--ranks, --rounds and --steps must be >= 1"),
    (["--warmup", "-1"], "--warmup >= 0"),
    (["--threads", "1"], r"--threads must be in \[--ranks \(2\)"),
    (["--ranks", "3", "--threads", "2"], r"--threads must be in \[--ranks \(3\)"),
])
def test_bad_options_are_refused_before_any_work(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_fsdp.main(argv)
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_a_json_path_that_is_a_folder_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_fsdp.main(["--json", str(tmp_path)])
    assert exit_info.value.code == 2 and "cannot write there" in capsys.readouterr().err


def test_a_json_path_ending_in_a_separator_is_refused_and_no_folder_made(tmp_path, capsys):
    """A path ending in a separator names a folder: refused before any work, and
    the folder it names is not made."""
    with pytest.raises(SystemExit) as exit_info:
        bench_fsdp.main(["--json", str(tmp_path / "new") + "/"])
    assert exit_info.value.code == 2 and "cannot write there" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
