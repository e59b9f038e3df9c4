"""tools/ptxas_resources.py's SASS check of an allowed kernel: local memory (STL/LDL)
is accepted outside loops only.  Synthetic listings in cuobjdump's format, so no
CUDA toolkit is needed."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import ptxas_resources  # noqa: E402


def _listing(*instructions: str) -> str:
    """A function's SASS as cuobjdump prints it, one instruction per 0x10 bytes."""
    head = "\t\tFunction : _Z6kernelv\n\t.headerflags\t@\"EF_CUDA_SM90\"\n"
    body = "".join(f"        /*{16 * i:04x}*/                   {ins} ;   /* 0x000000000000 */\n"
                   for i, ins in enumerate(instructions))
    return head + body


def test_local_memory_before_and_after_a_loop_is_accepted():
    sass = _listing("STL.64 [R1], R22", "LDG.E.128 R8, desc[UR16][R8.64]", "FADD R0, R1, R2",
                    "@!P0 BRA 0x10", "LDL.64 R16, [R1]", "EXIT")
    assert ptxas_resources.local_accesses_in_loops(sass) == (2, [])


def test_local_memory_in_a_loop_is_reported_with_its_address():
    sass = _listing("MOV R2, R3", "STL.S16 [R1], R2", "CALL.REL.NOINC 0x90", "LDL.LU R12, [R1]",
                    "@P0 BRA 0x0", "EXIT")
    count, inside = ptxas_resources.local_accesses_in_loops(sass)
    assert count == 2
    assert inside == ["00010 STL.S16 [R1], R2", "00030 LDL.LU R12, [R1]"]


def test_forward_branches_are_not_loops():
    sass = _listing("@P0 BRA 0x30", "STL [R1], R2", "BRA 0x40", "LDL R2, [R1]", "EXIT")
    assert ptxas_resources.local_accesses_in_loops(sass) == (2, [])


@pytest.mark.parametrize("cuobjdump", [None, "/bin/true"])
def test_an_allowed_kernel_without_its_sass_is_reported_as_not_checked(cuobjdump, tmp_path):
    log = tmp_path / "kernels.log"
    log.write_text("")
    verdict = ptxas_resources.check_sass({"mangled": "_Z6kernelv"}, str(log), cuobjdump)
    assert verdict.startswith("SASS not checked"), verdict
    assert not verdict.startswith("FAIL")


def _log(tmp_path, frame: int) -> str:
    """A ptxas -v report of one kernel, ``kernel()``, with a ``frame``-byte stack frame."""
    path = tmp_path / "kernels.log"
    path.write_text("ptxas info    : Compiling entry function '_Z6kernelv' for 'sm_90'\n"
                    "ptxas info    : Function properties for _Z6kernelv\n"
                    f"    {frame} bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
                    "ptxas info    : Used 10 registers, used 0 barriers\n")
    return str(path)


@pytest.mark.parametrize("frame", [0, 8])
def test_an_allowlist_entry_is_checked_or_reported_stale(frame, tmp_path, monkeypatch, capsys):
    """An allowed kernel with a frame passes with its SASS verdict (here: no object
    file beside the log); one without a frame any more is named as a stale entry;
    a kernel with a frame that no entry allows fails."""
    monkeypatch.setattr(ptxas_resources, "ALLOWED", [("kernel", "why")])
    assert ptxas_resources.main([_log(tmp_path, frame)]) == 0
    out = capsys.readouterr().out
    assert ("its entry can go" in out) == (frame == 0), out
    assert ("allowed: why; SASS not checked" in out) == (frame == 8), out
    monkeypatch.setattr(ptxas_resources, "ALLOWED", [])
    assert ptxas_resources.main([_log(tmp_path, frame)]) == (1 if frame else 0)
