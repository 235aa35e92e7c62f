"""The engine's dtype choice (float32 where the CPU would only emulate bf16) and where it runs."""

from distill.rollout.engine import cpu_has_bf16, engine_dtype, engine_inline

AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_cpu_bf16_is_read_from_the_flags():
    assert not cpu_has_bf16(AVX2)
    assert cpu_has_bf16(SAPPHIRE) and cpu_has_bf16(GRAVITON)
    assert not cpu_has_bf16("flags\t\t: avx2 bf16x\n")  # whole flags only


def test_auto_means_float32_only_on_a_cpu_without_bf16():
    assert engine_dtype("auto", cuda=False, cpuinfo=AVX2) == "float32"
    assert engine_dtype("auto", cuda=False, cpuinfo=SAPPHIRE) == "auto"
    assert engine_dtype("auto", cuda=True, cpuinfo=AVX2) == "auto"
    assert engine_dtype("bfloat16", cuda=False, cpuinfo=AVX2) == "bfloat16"  # an explicit choice stands


def test_the_engine_runs_inline_on_cpu_unless_told_otherwise():
    assert engine_inline("auto", cuda=False) and not engine_inline("auto", cuda=True)
    assert engine_inline("inline", cuda=True) and not engine_inline("separate", cuda=False)
