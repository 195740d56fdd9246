"""What a benchmark figure ran on: the CPU model and whether it has native bf16 arithmetic
(`avx512_bf16` or `amx_bf16` in /proc/cpuinfo's flags). CPUs of one cloud machine type differ,
and bf16 is ~1.5x faster than fp32 on one with avx512_bf16 but ~12x slower on one without,
so every benchmark prints this line above its figures (C++ benchmarks: core/cpu_features.h).
"""

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_info(path="/proc/cpuinfo"):
    """(model name, {flag: present} for BF16_FLAGS) of the first CPU in `path`."""
    model, flags = "unknown CPU", set()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, {flag: flag in flags for flag in BF16_FLAGS}


def has_native_bf16():
    return any(cpu_info()[1].values())


def describe_cpu():
    """One line, e.g. 'CPU: AMD EPYC 9R14 (avx512_bf16 yes, amx_bf16 no)' and, without native
    bf16, a note that bf16 figures on this machine are emulated."""
    model, flags = cpu_info()
    text = f"CPU: {model} (" + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items()) + ")"
    if not any(flags.values()):
        text += ("; no native bf16: bf16 matrix products are emulated here and run slower than "
                 "fp32, so bf16 figures from this machine say nothing about one that has it")
    return text
