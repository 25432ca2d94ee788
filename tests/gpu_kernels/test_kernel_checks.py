"""scripts/check_cuda_kernels.py, which CI runs on every CUDA build, must catch what
it is there for: an update kernel with too many registers for its resident blocks,
and a vector store split into pieces. Checked here on synthetic ptxas and SASS text."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_cuda_kernels.py"
spec = importlib.util.spec_from_file_location("check_cuda_kernels", SCRIPT)
checks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(checks)

PREFIX = "_ZN8noam_ext4cuda46_GLOBAL__N__1eb3d0ef_13_adamw_cuda_cu_af4a11d9"


def ptxas_entry(kernel: str, registers: int, arch: str = "sm_90") -> str:
    return (f"ptxas info    : Compiling entry function '{PREFIX}{kernel}EEvNS_9cuda_plan10KernelArgsE' for '{arch}'\n"
            "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
            f"ptxas info    : Used {registers} registers, used 0 barriers\n")


def test_ptxas_lines_are_read_per_kernel_and_arch():
    log = ptxas_entry("13update_kernelILi2ELb0E", 62) + ptxas_entry("14prepare_kernelIfE", 45, "sm_80")
    rows = checks.ptxas_table(log)
    assert [(r["arch"], r["kernel"], r["registers"]) for r in rows] == [
        ("sm_90", ("update_kernel", "bfloat16", False), 62), ("sm_80", ("prepare_kernel", "float", False), 45)]


def test_update_kernels_are_named_by_storage_h_in_its_order():
    names = checks.storage_names()
    assert names[:4] == ["double", "float", "bfloat16", "half"]   # torch's own storages first
    assert "bfloat16/bfloat16/bfloat16+remainder" in names
    index = names.index("bfloat16/bfloat16/float+float32 master")
    assert checks.describe(f"{PREFIX}13update_kernelILi{index}ELb1EEEv") == (
        "update_kernel", "bfloat16/bfloat16/float+float32 master", True)


def test_register_budget_follows_the_resident_blocks_policy(tmp_path, capsys):
    def run(log: str) -> int:
        path = tmp_path / "build.log"
        path.write_text(log)
        import sys
        argv, sys.argv = sys.argv, ["check_cuda_kernels.py", str(path)]
        try:
            return checks.main()
        finally:
            sys.argv = argv

    assert run(ptxas_entry("13update_kernelILi1ELb0E", 64) + ptxas_entry("13update_kernelILi1ELb1E", 80)) == 0
    # 72 registers allow 3 blocks of 256 threads: too few without amsgrad.
    assert run(ptxas_entry("13update_kernelILi3ELb0E", 72)) == 1
    assert "fewer than 4" in capsys.readouterr().err
    # A low-byte storage has the same budget.
    assert run(ptxas_entry("13update_kernelILi10ELb0E", 72)) == 1
    # double has no such requirement.
    assert run(ptxas_entry("13update_kernelILi0ELb0E", 126)) == 0
    assert run("no ptxas here: a CPU-only build log") == 0


def test_split_vector_stores_are_found_in_the_sass():
    sass = f"""
	arch = sm_90
		Function : {PREFIX}13update_kernelILi3ELb0EEEvNS_9cuda_plan10KernelArgsE
        /*0100*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*0110*/                   STG.E.64 desc[UR4][R6.64], R8 ;
        /*0120*/                   ST.E.U16 desc[UR4][R6.64], R9 ;
		Function : {PREFIX}13update_kernelILi1ELb0EEEvNS_9cuda_plan10KernelArgsE
        /*0100*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*0110*/                   STG.E desc[UR4][R6.64], R8 ;
"""
    stores = checks.global_stores(sass)
    half = stores[("sm_90", "half", False)]
    assert half == {"STG.E.128": 1, "STG.E.64": 1}   # ST.E.U16 is the element path's generic store
    assert stores[("sm_90", "float", False)]["STG.E"] == 1   # a 32-bit piece of a vector
    problems = checks.store_failures(stores)
    assert len(problems) == 1 and problems[0].startswith("sm_90 update float:")


def test_eight_bit_kernels_may_store_codes_in_eight_bytes_but_nothing_narrower():
    # kSupportedStorage[12] is float32 parameters with 8-bit moments: a lane's codes of a
    # moment are one 8-byte store; a 32-bit global store there is still a split vector.
    sass = f"""
	arch = sm_90
		Function : {PREFIX}13update_kernelILi12ELb0EEEvNS_9cuda_plan10KernelArgsE
        /*0100*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*0110*/                   STG.E.64 desc[UR4][R6.64], R8 ;
        /*0120*/                   STG.E.64 desc[UR4][R6.64], R10 ;
        /*0130*/                   STG.E.64 desc[UR4][R6.64], R12 ;
		Function : {PREFIX}13update_kernelILi12ELb1EEEvNS_9cuda_plan10KernelArgsE
        /*0100*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*0110*/                   STG.E.64 desc[UR4][R6.64], R8 ;
        /*0120*/                   STG.E.64 desc[UR4][R6.64], R10 ;
        /*0130*/                   STG.E desc[UR4][R6.64], R12 ;
"""
    problems = checks.store_failures(checks.global_stores(sass))
    assert len(problems) == 1 and problems[0].startswith("sm_90 update float/float/8bit amsgrad:")


def test_spills_fail_the_check_except_in_cudas_slow_paths():
    ours = ("ptxas warning : Registers are spilled to local memory in function "
            f"'{PREFIX}13update_kernelILi5ELb1EEEvNS_9cuda_plan10KernelArgsE', 96 bytes spill stores, 84 bytes spill loads")
    theirs = ("ptxas warning : Registers are spilled to local memory in function "
              "'__cuda_sm3x_div_rn_noftz_f32_slowpath', 32 bytes spill stores, 32 bytes spill loads")
    assert checks.spill_failures(theirs) == []
    failures = checks.spill_failures(theirs + "\n" + ours)
    assert len(failures) == 1 and "update_kernelILi5ELb1E" in failures[0]


def test_help_is_help_not_a_log_path(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit:
        checks.main(["--help"])
    assert exit.value.code == 0
    assert "usage: check_cuda_kernels.py" in capsys.readouterr().out


def test_quiet_prints_one_summary_line(tmp_path, capsys):
    path = tmp_path / "build.log"
    path.write_text(ptxas_entry("13update_kernelILi1ELb0E", 64) + ptxas_entry("14prepare_kernelIfE", 40))
    assert checks.main([str(path), "--quiet"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["CUDA kernels (ptxas): 2 kernels checked for spills and resident blocks"]


def test_a_cuobjdump_that_cannot_disassemble_skips_the_sass_check(tmp_path, capsys, monkeypatch):
    # cuobjdump -sass needs nvdisasm: without it, the store check says it was skipped and why.
    fake = tmp_path / "cuobjdump"
    fake.write_text("#!/bin/sh\necho 'cuobjdump fatal   : nvdisasm not found' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(checks, "find_cuobjdump", lambda: str(fake))
    path = tmp_path / "build.log"
    path.write_text(ptxas_entry("13update_kernelILi1ELb0E", 64))
    assert checks.main([str(path), str(tmp_path / "_C.so")]) == 0
    assert "SASS store check skipped" in capsys.readouterr().out
