"""The GPU side of the colocated memory choreography, against the real APIs (skipped without CUDA).

- vLLM's sleep mode through :class:`VllmEngine` (``enable_sleep_mode``, ``sleep(level)``,
  ``wake_up(tags)``): device memory is released by ``sleep`` and re-acquired by ``wake_up``;
  after ``wake_up(["weights"])`` + a weight load + ``wake_up(["kv_cache"])`` the engine
  generates exactly what it generated before sleeping (greedy), at level 1 (weights kept on
  host) and level 2 (weights discarded, rewritten by the load). Needs vLLM for CUDA.
- ``trainer.offload``: the optimizer state leaves the device and comes back unchanged; Adam
  steps after the round trip equal steps without it (bitwise); the model's parameters never move.

Run where a CUDA machine with vLLM is available: ``pytest tests/gpu/test_colocated_memory_cuda.py``.
"""
from __future__ import annotations

import pytest
import torch

from testlib.tiny_models import tiny_config

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
PROMPTS = [[1, 17, 42, 99], [1, 300, 5]]


def _free_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


@pytest.mark.vllm
@pytest.mark.parametrize("level", [1, 2])
def test_vllm_sleep_releases_memory_and_wake_restores_generation(tmp_path, level):
    pytest.importorskip("vllm")
    from megatron_rpp.rollout.engine import SamplingConfig
    from megatron_rpp.rollout.vllm_engine import VllmEngine

    cfg = tiny_config("llama", tied=False)
    engine = VllmEngine.from_hf_config(cfg, tmp_path / "engine", dtype=torch.bfloat16, seed=0, max_model_len=128,
                                       gpu_memory_utilization=0.3, enable_sleep_mode=True)
    try:
        assert engine.sleep_supported
        # Known weights (the dummy load is random): the same HF tensors are loaded again after waking.
        hf = _hf_weights(cfg)
        engine.update_weights(iter(hf))
        greedy = SamplingConfig(temperature=0.0, max_tokens=8)
        before = [r.token_ids for r in engine.generate(PROMPTS, greedy)]

        awake = _free_bytes()
        engine.sleep(level=level)
        asleep = _free_bytes()
        assert asleep > awake  # KV cache (and at level 2 the weights) released
        with pytest.raises(RuntimeError, match="asleep"):
            engine.generate(PROMPTS, greedy)
        engine.wake_up(["weights"])
        engine.update_weights(iter(hf))  # level 2 discarded the weights: the load rewrites them
        engine.wake_up(["kv_cache"])
        assert _free_bytes() < asleep
        assert [r.token_ids for r in engine.generate(PROMPTS, greedy)] == before
    finally:
        engine.shutdown()


def _hf_weights(cfg: dict) -> list[tuple[str, torch.Tensor]]:
    """A random HF model of ``cfg`` (transformers' own init), as (name, bf16 tensor) pairs."""
    import transformers

    cfg = dict(cfg)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    return [(n, t.to(torch.bfloat16)) for n, t in model.state_dict().items()]


def test_optimizer_state_round_trip_is_exact_and_frees_device_memory():
    from megatron_rpp.trainer.offload import move_optimizer_state

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 64)).to(CUDA)
    twin = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 64)).to(CUDA)
    twin.load_state_dict(model.state_dict())
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (model, twin)]
    x = torch.randn(16, 1024, device=CUDA)

    def step(m, opt):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()

    for m, opt in zip((model, twin), opts):
        step(m, opt)
    params_before = [p.data_ptr() for p in model.parameters()]
    state_bytes = sum(v.numel() * v.element_size() for s in opts[0].state.values() for v in s.values()
                      if torch.is_tensor(v) and v.dim() > 0)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    moved = move_optimizer_state(opts[0], "cpu", keep=model.parameters())
    torch.cuda.synchronize()
    assert moved == state_bytes  # the moments only: the model's parameters were kept
    assert allocated - torch.cuda.memory_allocated() >= state_bytes
    assert [p.data_ptr() for p in model.parameters()] == params_before
    assert all(v.device.type == "cpu" for s in opts[0].state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    move_optimizer_state(opts[0], CUDA, keep=model.parameters())
    for _ in range(3):
        for m, opt in zip((model, twin), opts):
            step(m, opt)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_offload_training_state_with_megatron_ddp():
    """Megatron's DDP grad buffers are freed and restored (zeroed) around the optimizer-state move."""
    pytest.importorskip("megatron.core")
    import torch.distributed as dist

    from megatron_rpp.trainer.offload import offload_training_state, onload_training_state

    if not dist.is_initialized():
        import os

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl", rank=0, world_size=1)
    from megatron_rpp.models.provider import build_gpt_model
    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.parallel.groups import initialize_parallel
    from megatron_rpp.trainer.optim import OptimConfig, wrap_for_training

    cfg = tiny_config("llama")
    groups = initialize_parallel(1, 1)
    spec = architecture_for_config(cfg).model_spec(cfg).for_tp(1)
    model = build_gpt_model(spec, groups, dtype=torch.bfloat16)
    ddp, optimizer = wrap_for_training(model, OptimConfig(lr=1e-4), dtype=torch.bfloat16)
    tokens = torch.randint(0, spec.vocab_size, (2, 16), device=CUDA)
    ddp.zero_grad_buffer()
    ddp(tokens, None, None).float().mean().backward()
    optimizer.step()
    free = _free_bytes()
    moved = offload_training_state(ddp, optimizer)
    assert moved > 0 and _free_bytes() > free
    onload_training_state(ddp, optimizer)
    assert all(float(b.grad_data.abs().max()) == 0.0 for b in ddp.buffers)
    ddp.zero_grad_buffer()
    ddp(tokens, None, None).float().mean().backward()
    ok, _, _ = optimizer.step()
    assert ok
