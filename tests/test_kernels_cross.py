"""Kernel tables this host cannot load through pytest: tests/kernels_check.c (every available
table against the scalar one, the twin checks of test_kernels.py in C) built with a cross
compiler and run under qemu user mode. On an x86-64 host that is the NEON and NEON-dotprod
tables, and their run-time detection (a Cortex-A53 has no dot-product extension). The checker
also runs natively, against the tables test_kernels.py checks too. Skipped without the tools."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [str(ROOT / "tests" / "kernels_check.c"), str(ROOT / "native" / "kernels.c")]
CROSS_CC, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"
CHECKS_PER_ISA = 176  # kernels_check.c: 3 + dot_q8 2 per (type, size), axpy4 1 per size >= 128, f32 ops 20,
#                      gemm_q8 2 per (integer type, shape)


def build(cc: str, out: Path, *flags: str) -> Path:
    subprocess.run([cc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", *flags,
                    "-I", str(ROOT / "native"), *SOURCES, "-lm", "-pthread", "-o", str(out)],
                   check=True, capture_output=True, text=True)
    return out


def run_check(cmd: list[str]) -> tuple[list[str], dict[str, str]]:
    """Runs the checker: the ISAs it found available, and each one's verdict line."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    lines = r.stdout.splitlines()
    assert lines and lines[0].startswith("available:"), r.stdout + r.stderr
    available = lines[0].split()[1:]
    verdicts = {ln.split()[0]: ln for ln in lines[1:]}
    assert r.returncode == sum("FAIL" in v for v in verdicts.values()), r.stdout
    return available, verdicts


def test_checker_passes_on_this_host(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    available, verdicts = run_check([str(build(cc, tmp_path / "check"))])
    assert "scalar" in available
    for isa in available:
        assert verdicts[isa] == f"{isa} ok {CHECKS_PER_ISA}", verdicts[isa]


@pytest.mark.parametrize("cpu,expected", [("max", ["scalar", "neon", "neon_dotprod"]),
                                          ("cortex-a53", ["scalar", "neon"])])
def test_neon_tables_under_qemu(tmp_path, cpu, expected):
    if platform.machine() in ("aarch64", "arm64"):
        pytest.skip("an arm64 host runs its NEON tables in test_kernels.py")
    if not shutil.which(CROSS_CC) or not shutil.which(QEMU):
        pytest.skip(f"needs {CROSS_CC} and {QEMU}")
    exe = build(CROSS_CC, tmp_path / "check", "-static")
    available, verdicts = run_check([QEMU, "-cpu", cpu, str(exe)])
    assert available == expected
    for isa in available:
        assert verdicts[isa] == f"{isa} ok {CHECKS_PER_ISA}", verdicts[isa]
