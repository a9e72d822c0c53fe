"""The one-command GPU check: compiled Triton kernels, fused output layer, Megatron on CUDA, bf16 training.

    bash tests/gpu/run_gpu_checks.sh              # this script + tests/gpu (the usual entry point)
    python benchmarks/gpu_check.py [--quick]      # this script alone; --cpu-dry-run: its CPU-capable parts here

For a single-GPU machine with torch + CUDA + Triton (no vLLM needed; megatron-core from a wheel
if it is not installed: see docs/gpu.md). Under 10 minutes. Every section runs on its own and
records ``ok`` / ``failed`` (with the error) / ``skipped`` (with the reason) in the JSON, so one
broken part never hides the others:

1. ``environment``: torch, CUDA device, Triton, megatron-core, Transformer Engine.
2. ``triton_kernels``: the log-prob kernels compiled (``TRITON_INTERPRET=0``) at realistic sizes,
   checked against float64; the forward's logits read bandwidth as a share of this device's
   device-to-device copy bandwidth (``dst.copy_(src)``, read + write bytes), target >= 70 %.
3. ``fused_linear``: ``fused_linear_log_probs`` vs the naive ``hidden @ weight.T`` + log-softmax,
   forward+backward time and peak memory above the inputs (``torch.cuda.max_memory_allocated``).
4. ``megatron_local`` / ``megatron_te``: a Megatron GPTModel (local layer spec; TE spec when
   Transformer Engine imports) built by ``provider.build_model`` on CUDA, weights loaded through
   the parameter table, logits in fp32 (TF32 off) and bf16 vs the CPU fp32 reference: the same
   weights in the project's CPU path (a gloo rank with CUDA hidden, a subprocess).
5. ``bf16_train_step``: a bf16 model with Megatron's mixed-precision optimizer (fp32 main
   parameters) takes two steps of the trainer's ``forward_backward`` through the fused output
   layer: finite loss and gradient norm, the loss goes down, the weights move.

Writes benchmarks/results/gpu_check.json (``--out``) and prints one line per section.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

if __name__ == "__main__":  # before Triton is imported anywhere: compile for the GPU, never interpret
    os.environ["TRITON_INTERPRET"] = "0" if "--cpu-dry-run" not in sys.argv else "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.json"
TARGET_BANDWIDTH_SHARE = 0.70
#: A tiny Llama (GQA, untied) for the Megatron sections; head_dim 64 as everywhere in the tests.
TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
              "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
              "vocab_size": 1024, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "hidden_act": "silu", "tie_word_embeddings": False}


def _timed(fn, reps: int, sync) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------- 1. environment


def environment(device) -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    for mod in ("triton", "megatron.core", "transformer_engine"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod] = getattr(m, "__version__", "?")
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            out[mod] = f"not importable: {type(e).__name__}: {e}"[:200]
    return out


# ----------------------------------------------------------------------------- 2. Triton kernels


def triton_kernels(device, quick: bool) -> dict:
    import torch

    from megatron_rpp.kernels import BACKEND_ENV, vocab_parallel_log_probs
    from megatron_rpp.kernels.reference import naive_log_probs

    os.environ[BACKEND_ENV] = "triton"
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n, v = (1024, 32000) if quick or not cuda else (4096, 152064)
    if not cuda:
        n, v = 64, 4096  # the interpreter: correctness only
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        g = torch.Generator(device=device).manual_seed(0)
        logits = (torch.randn(n, v, device=device, generator=g) * 3).to(dtype)
        labels = torch.randint(0, v, (n,), device=device, generator=g)
        x = logits.clone().requires_grad_()
        lp, ent = vocab_parallel_log_probs(x, labels, temperature=0.9, with_entropy=True)
        (lp.sum() + ent.sum()).backward()
        x64 = logits.double().requires_grad_()
        ref_lp, ref_ent = naive_log_probs(x64, labels, 0.9, True, dtype=torch.float64)
        (ref_lp.sum() + ref_ent.sum()).backward()
        err = {"log_prob_max_abs_err": float((lp.double() - ref_lp).abs().max()),
               "entropy_max_abs_err": float((ent.double() - ref_ent).abs().max()),
               "grad_max_rel_err": float((x.grad.double() - x64.grad).abs().max() / x64.grad.abs().max())}
        row = {"dtype": str(dtype).split(".")[-1], "N": n, "V": v, **err}
        if cuda:
            with torch.no_grad():
                fwd = _timed(lambda: vocab_parallel_log_probs(logits, labels, temperature=0.9), 10, sync)
            copy = torch.empty_like(logits)
            t_copy = _timed(lambda: copy.copy_(logits), 10, sync)
            nbytes = logits.numel() * logits.element_size()
            row.update(fwd_s=fwd, fwd_read_gbps=nbytes / fwd / 1e9, copy_gbps=2 * nbytes / t_copy / 1e9)
            row["fwd_bandwidth_share"] = row["fwd_read_gbps"] / row["copy_gbps"]
            row["target_met"] = row["fwd_bandwidth_share"] >= TARGET_BANDWIDTH_SHARE
        ok_tol = 1e-4 if dtype == torch.float32 else 2e-2
        row["accurate"] = err["log_prob_max_abs_err"] < ok_tol and err["grad_max_rel_err"] < (1e-5 if dtype ==
                                                                                            torch.float32 else 1e-2)
        rows.append(row)
        del logits, x, x64, lp, ent, ref_lp, ref_ent
    if not all(r["accurate"] for r in rows):
        raise AssertionError(f"Triton kernels disagree with float64: {rows}")
    return {"rows": rows, "target_bandwidth_share": TARGET_BANDWIDTH_SHARE}


# ----------------------------------------------------------------------------- 3. fused linear


def fused_linear(device, quick: bool) -> dict:
    import torch

    from megatron_rpp.kernels import fused_linear_log_probs
    from megatron_rpp.kernels.reference import naive_log_probs

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n, h, v = (2048, 2048, 32000) if quick else (4096, 4096, 152064)
    if not cuda:
        n, h, v = 128, 64, 2048
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(n, h, device=device, generator=g).to(torch.bfloat16)
    weight = (torch.randn(v, h, device=device, generator=g) / h ** 0.5).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), device=device, generator=g)

    def step(method):
        hh, ww = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        out = fused_linear_log_probs(hh, ww, labels) if method == "fused" else naive_log_probs(hh @ ww.T, labels, 1.0)
        out.sum().backward()
        return out.detach(), hh.grad, ww.grad

    rows = {}
    for method in ("naive", "fused"):
        step(method)  # warm-up (Triton compile, cuBLAS)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        result = step(method)
        sync()
        peak = (torch.cuda.max_memory_allocated() - base) if cuda else float("nan")
        mandatory = sum(t.numel() * t.element_size() for t in result)  # outputs any implementation returns
        rows[method] = {"fwd_bwd_s": _timed(lambda: step(method), 3, sync),
                        "extra_peak_mib": (peak - mandatory) / 2**20, "log_probs": result[0].float()}
    diff = float((rows["fused"]["log_probs"] - rows["naive"]["log_probs"]).abs().max())
    for r in rows.values():
        del r["log_probs"]
    out = {"N": n, "H": h, "V": v, "dtype": "bfloat16", **{f"{m}_{k}": val for m, r in rows.items()
                                                            for k, val in r.items()},
           "log_prob_max_abs_diff": diff, "time_vs_naive": rows["fused"]["fwd_bwd_s"] / rows["naive"]["fwd_bwd_s"]}
    if cuda:
        out["extra_memory_vs_naive"] = rows["fused"]["extra_peak_mib"] / rows["naive"]["extra_peak_mib"]
    if diff > 0.1:  # bf16 logits in both; the fused path sums in fp32
        raise AssertionError(f"fused and naive log-probs differ by {diff}")
    return out


# ----------------------------------------------------------------------------- 4. Megatron on CUDA


def _full_weights(spec, seed: int = 0) -> dict:
    """Random full (TP=1) Megatron tensors by canonical name, O(1) logits (norms around 1)."""
    import torch

    from megatron_rpp.models.architectures import get_architecture

    g = torch.Generator().manual_seed(seed)
    out = {}
    for e in get_architecture(spec.architecture).param_table(spec):
        if e.role.endswith("norm"):
            out[e.name] = 1 + 0.1 * torch.randn(e.shape, generator=g)
        else:
            out[e.name] = torch.randn(e.shape, generator=g) / e.shape[-1] ** 0.5
    return out


def _tokens(spec, seed: int = 3):
    import torch

    return torch.randint(0, spec.vocab_size, (2, 48), generator=torch.Generator().manual_seed(seed))


def _logits_on_rank(cfg: dict, full: dict, tokens, dtype_name: str):
    """Per-rank work (CPU gloo rank or the CUDA process): full logits [B, S, V] fp32."""
    import torch

    from megatron_rpp.data.rollout_batch import RolloutBatch
    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.models.provider import build_model, naming
    from megatron_rpp.models.scoring import forward_score
    from megatron_rpp.parallel.gather import load_full_params
    from megatron_rpp.parallel.groups import initialize_parallel

    dtype = getattr(torch, dtype_name)
    groups = initialize_parallel(1, 1, seed=0)
    spec = architecture_for_config(cfg).model_spec(cfg).for_tp(1)
    model = build_model(spec, groups, dtype=dtype)
    load_full_params(model, groups, {k: v.to(dtype) for k, v in full.items()})
    batch = RolloutBatch.from_sequences(tokens.tolist(), [[] for _ in range(tokens.shape[0])])
    logits = forward_score(model, groups, batch, lambda out, mb, ids, ri: out.float(), micro_batch_size=len(batch))
    return {"logits": logits[..., : spec.vocab_size], "naming": naming(),
            "device": str(next(model.parameters()).device)}


def cpu_reference_logits(cfg: dict, full: dict, tokens):
    """The CPU fp32 reference: the same weights through the project's CPU path, on a gloo rank with CUDA hidden."""
    from megatron_rpp.parallel.spawn import run_ranks

    env = {"CUDA_VISIBLE_DEVICES": "", "MEGATRON_RPP_LAYER_SPEC": "local"}
    return run_ranks(_logits_on_rank, 1, cfg, full, tokens, "float32", env=env, backend="gloo", timeout=600)[0]


def megatron(device, layer_spec: str, reference: dict) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.models.provider import LAYER_SPEC_ENV, te_available

    if layer_spec == "te" and not te_available():
        return {"skipped": "Transformer Engine does not import (or no CUDA)"}
    os.environ[LAYER_SPEC_ENV] = layer_spec
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    spec = architecture_for_config(TINY_LLAMA).model_spec(TINY_LLAMA).for_tp(1)
    full, tokens = _full_weights(spec), _tokens(spec)
    if not dist.is_initialized():
        from megatron_rpp.parallel.spawn import default_backend, free_port

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group(default_backend(device.type == "cuda"), rank=0, world_size=1)
    out = {}
    ref = reference["logits"]
    for dtype_name, tol in (("float32", 1e-4), ("bfloat16", 0.15)):
        got = _logits_on_rank(TINY_LLAMA, full, tokens, dtype_name)
        diff = float((got["logits"].cpu() - ref).abs().max())
        out[dtype_name] = {"max_abs_logit_diff": diff, "tolerance": tol, "naming": got["naming"],
                           "device": got["device"], "logit_scale": float(ref.abs().max())}
        if got["naming"] != layer_spec:
            raise AssertionError(f"built the {got['naming']} spec, asked for {layer_spec}")
        if not diff <= tol:
            raise AssertionError(f"{layer_spec} {dtype_name}: max |logit diff| {diff:.3g} > {tol} vs the CPU reference")
    return out


# ----------------------------------------------------------------------------- 5. bf16 training


def bf16_train_step(device) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_rpp.data.rollout_batch import RolloutBatch
    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.models.pipeline import forward_backward, model_device
    from megatron_rpp.models.provider import LAYER_SPEC_ENV, build_model
    from megatron_rpp.models.scoring import output_context, to_micro_batches, token_log_probs
    from megatron_rpp.parallel.gather import gather_full_params, load_full_params
    from megatron_rpp.parallel.groups import initialize_parallel
    from megatron_rpp.trainer.optim import OptimConfig, step_if_finite, wrap_for_training, zero_grad

    if device.type != "cuda":
        return {"skipped": "bf16 training needs CUDA (on CPU model.dtype=bf16 is refused)"}
    os.environ[LAYER_SPEC_ENV] = "auto"
    if not dist.is_initialized():
        from megatron_rpp.parallel.spawn import free_port

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("nccl", rank=0, world_size=1)
    groups = initialize_parallel(1, 1, seed=0)
    spec = architecture_for_config(TINY_LLAMA).model_spec(TINY_LLAMA).for_tp(1)
    model = build_model(spec, groups, dtype=torch.bfloat16)
    load_full_params(model, groups, {k: v.bfloat16() for k, v in _full_weights(spec).items()})
    ddp, opt = wrap_for_training(model, OptimConfig(lr=1e-3, clip_grad=1.0), dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    batch = RolloutBatch.from_sequences(torch.randint(0, spec.vocab_size, (4, 16), generator=g).tolist(),
                                        torch.randint(0, spec.vocab_size, (4, 32), generator=g).tolist())
    n = batch.num_response_tokens
    mbs = to_micro_batches(batch, 2, model_device(model))

    def loss_fn(output, mb):
        b = mb.extras["batch"]
        lp, _ = token_log_probs(output, ddp, b, mb.input_ids, mb.extras["resp_index"], tp_group=None,
                                temperature=1.0, fused=True, with_entropy=False)
        loss = -lp.sum() / n
        return loss, {"loss": loss.detach().float()}

    before = gather_full_params(model, groups)
    losses, norms = [], []
    for _ in range(2):
        zero_grad(ddp, opt)
        with output_context(ddp, True):
            aux = forward_backward(ddp, mbs, loss_fn, groups, forward_only=False)
        loss = torch.stack([a["loss"] for a in aux]).sum()
        ok, grad_norm = step_if_finite(ddp, opt, loss)
        if not ok:
            raise AssertionError(f"non-finite step: loss {float(loss)}")
        losses.append(float(loss))
        norms.append(float(grad_norm))
    after = gather_full_params(model, groups)
    moved = min(float((after[k].float() - before[k].float()).abs().max()) for k in before)
    inner = getattr(opt, "chained_optimizers", [opt])
    out = {"losses": losses, "grad_norms": norms, "min_param_change": moved,
           "optimizer": sorted({type(o).__name__ for o in inner}),
           "param_dtype": str(next(model.parameters()).dtype)}
    if not (losses[1] < losses[0] and moved > 0):
        raise AssertionError(f"bf16 training did not learn: {out}")
    return out


# ----------------------------------------------------------------------------- driver


def run_section(name: str, fn, *args) -> dict:
    t0 = time.perf_counter()
    try:
        result = fn(*args)
        status = "skipped" if isinstance(result, dict) and "skipped" in result else "ok"
    except Exception as e:  # noqa: BLE001 - every section is reported, none hides the others
        result, status = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}, "failed"
    result = {"status": status, "seconds": round(time.perf_counter() - t0, 1), **result}
    summary = result.get("skipped") or result.get("error", "")
    print(f"[gpu_check] {name:18s} {status:7s} {result['seconds']:6.1f} s  {summary}"[:300], flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="megatron_rpp's one-command GPU check (docs/gpu.md)")
    ap.add_argument("--quick", action="store_true", help="smaller kernel sizes (a smoke run)")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="no GPU here: run the CPU-capable parts (interpreted kernels, the Megatron sections on CPU)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_dry_run:
        print("[gpu_check] no CUDA device: nothing to check (use --cpu-dry-run to exercise the script on CPU)")
        return 0
    if cuda and os.environ.get("TRITON_INTERPRET") not in (None, "", "0"):
        sys.exit("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled; unset it")
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(0)
    report = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu_dry_run": not cuda}
    report["environment"] = run_section("environment", environment, device)
    report["triton_kernels"] = run_section("triton_kernels", triton_kernels, device, args.quick)
    report["fused_linear"] = run_section("fused_linear", fused_linear, device, args.quick)
    spec = None
    try:
        from megatron_rpp.models.architectures import architecture_for_config

        spec = architecture_for_config(TINY_LLAMA).model_spec(TINY_LLAMA).for_tp(1)
        reference = run_section("cpu_reference", cpu_reference_logits, TINY_LLAMA, _full_weights(spec), _tokens(spec))
    except Exception as e:  # noqa: BLE001
        reference = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    report["cpu_reference"] = {k: v for k, v in reference.items() if k != "logits"}
    for layer_spec in ("local", "te"):
        key = f"megatron_{layer_spec}"
        if reference["status"] != "ok":
            report[key] = {"status": "skipped", "skipped": "no CPU reference (see cpu_reference)"}
        else:  # (a CPU dry run compares the CPU path in this process with the subprocess's)
            report[key] = run_section(key, megatron, device, layer_spec, reference)
    report["bf16_train_step"] = run_section("bf16_train_step", bf16_train_step, device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    failed = [k for k, v in report.items() if isinstance(v, dict) and v.get("status") == "failed"]
    print(f"[gpu_check] wrote {args.out}; failed sections: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
