"""precision=auto picks bf16 only where the CPU computes it natively."""
import torch

from simxent.runtime import cpu_supports_bf16, resolve_dtype

AVX2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma f16c\n\nprocessor\t: 1\nflags\t\t: fpu sse sse2 avx avx2 fma f16c\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile\n"


def test_bf16_only_with_native_bf16_flags(monkeypatch):
    assert not cpu_supports_bf16(AVX2)
    assert cpu_supports_bf16(SAPPHIRE_RAPIDS)
    # A flag's name elsewhere in the file (a model name, say) is not the flag.
    assert not cpu_supports_bf16("model name\t: avx512_bf16 lookalike\nflags\t\t: avx2\n")
    cpu = torch.device("cpu")
    for info, expected in ((AVX2, None), (SAPPHIRE_RAPIDS, torch.bfloat16)):
        monkeypatch.setattr("simxent.runtime.cpu_supports_bf16", lambda info=info: cpu_supports_bf16(info))
        assert resolve_dtype("auto", cpu) is expected
        assert resolve_dtype("bf16", cpu) is torch.bfloat16 and resolve_dtype("fp32", cpu) is None


def test_auto_takes_fp16_on_a_gpu_whose_bf16_is_only_emulated(monkeypatch):
    """torch.cuda.is_bf16_supported() counts emulated bf16 (V100, T4) by default; auto asks for native bf16,
    and gives those GPUs fp16 (their tensor cores' format) instead of slow emulated bf16."""
    asked = []

    def supported(including_emulation=True):
        asked.append(including_emulation)
        return including_emulation  # a V100: bf16 only by emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert resolve_dtype("auto", torch.device("cuda")) is torch.float16 and asked == [False]
