"""Suite-wide settings. Environment variables that must be set before heavy imports live here."""
import os

# Triton kernels run on CPU tensors only under the interpreter; must be set before `import triton`.
os.environ.setdefault("TRITON_INTERPRET", "1")
# vLLM on CPU: engine in the calling process, small KV cache, no hub access.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Ray: no token written under $HOME. (The rendezvous address and gloo's interface are chosen by
# the worker group: rank 0's node and the interface routing there, megatron_rpp/parallel/network.py.)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


#: Set to 1 to also run the ``extended`` tests: second variants of what a default test already covers
#: (listed with what covers each in docs/testing.md), kept out of CI's suite to hold it near 40 minutes.
EXTENDED = os.environ.get("RPP_EXTENDED_TESTS") == "1"


def pytest_collection_modifyitems(config, items):
    if not EXTENDED:
        skip_extended = pytest.mark.skip(reason="extended test: set RPP_EXTENDED_TESTS=1 (docs/testing.md)")
        for item in items:
            if "extended" in item.keywords:
                item.add_marker(skip_extended)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing means nothing runs anyway
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
