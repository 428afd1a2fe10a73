"""sage_attn: 8-bit SageAttention as an SGLang attention backend plugin.

Installs only this project's modules into the installed ``sglang`` tree (never an
``__init__.py`` of ``sglang``, ``sglang.srt``, ``sglang.srt.layers`` or
``sglang.srt.layers.attention``) and registers the ``sage_attn`` plugin.
"""

from setuptools import setup

setup(
    name="sage-attn",
    version="0.1.0",
    description="8-bit SageAttention (INT8 QK, FP16/FP8 PV) attention backend for SGLang",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    package_dir={"": "python"},
    packages=["sglang.srt.layers.attention.sage_attention"],
    # A module directly in sglang/srt/layers/attention/, beside SGLang's backends.
    py_modules=["sglang.srt.layers.attention.sage_attention_backend"],
    install_requires=["sglang==0.5.23"],
    # ruff pinned: its formatter changes between releases and CI checks formatting.
    # pytest-xdist: the README's test command runs on two workers (CI has two cores).
    extras_require={"test": ["pytest", "pytest-xdist", "ruff==0.17.6"]},
    entry_points={
        "sglang.srt.plugins": [
            "sage_attn = sglang.srt.layers.attention.sage_attention.plugin:register",
        ],
    },
)
