"""What every stage's training shares: the precision a config's "auto" resolves to."""

from __future__ import annotations

from sorakit.training.common import cpu_flags, resolve_precision


def test_auto_precision_is_bf16_only_on_cpus_with_fast_bf16(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert "avx512_bf16" in cpu_flags(info) and cpu_flags(tmp_path / "missing") == set()
    assert resolve_precision("auto", "cpu", cpu_flags(info)) == "bf16-mixed"
    assert resolve_precision("auto", "cpu", {"avx2", "avx512f"}) == "32-true"  # bf16 only converted: no gain
    assert resolve_precision("auto", "cpu", {"amx_bf16", "amx_tile"}) == "bf16-mixed"
    assert resolve_precision("16-mixed", "cpu", set()) == "16-mixed"  # anything else passes through
