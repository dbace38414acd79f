"""torch.compile of rewritten models: no graph break, the eager values.

The TP layers' collectives are traced (Dynamo maps ``torch.distributed`` collectives to functional
ones; the overlapped all-reduce of the input gradient is synchronous while traced, the compiler
schedules it), the vocab-parallel embedding's id-range check stays in the graph
(``torch._assert_async`` instead of ``.item()``), and sequence parallelism's gather keeps no
identity bookkeeping while traced. Two ways to compile, both checked against eager (fp32, one
forward and backward: loss and gradients rel <= 1e-6; an AdamW step: the next loss rel <= 1e-6,
the weights within a quarter of one step) and for graph breaks (``torch._dynamo.explain``):

* the whole model: inside the compiled region the vocab-parallel head returns dense (gathered)
  logits, the loss is the plain cross entropy;
* each transformer block (regional compilation, what torchtitan does;
  ``lightning_tp.engine.compiled.compile_layers``, the recipes' ``compile: true``): the head and
  the vocab-parallel loss stay eager, logits stay sharded.

The compiler backend is ``aot_eager`` (Dynamo and AOTAutograd, no code generation: the graphs,
joint forward/backward included, without a C++ compiler's minutes); the benchmark runs inductor.
"""

from __future__ import annotations

import pytest
import torch

import _dist

VOCAB, SEQ = 30, 12
RTOL = 1e-6  # losses (both steps) and gradients, relative
LR = 1e-3
STEP_TOL = 0.25  # weights after one AdamW step: no element off by a quarter of one step (a wrong one is >= 1)


def _model(kind: str):
    import models

    torch.manual_seed(0)
    if kind == "plain":
        return models.PlainGPT(vocab=VOCAB, d=32, n_layers=2, n_heads=4, tied=True, ctx=SEQ)
    return models.NanoGPT(vocab=VOCAB, n_embd=32, n_layer=2, n_head=4, block_size=SEQ)  # fused c_attn, own code


def _blocks(model) -> list[torch.nn.Module]:
    return list(model.layers) if hasattr(model, "layers") else list(model.transformer.h)


def _loss_backward(model, idx, tgt):
    from lightning_tp import cross_entropy
    from lightning_tp.lightning.precision import all_reduce_partial_grads

    logits = model(idx)
    loss = cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1))
    loss.backward()
    all_reduce_partial_grads(list(model.parameters()), _dist.mesh(2).tp_group)
    return float(loss)


def _rel(pairs) -> float:
    return max(float((a - b).abs().max()) / max(1e-6, float(a.abs().max())) for a, b in pairs)


def _case(kind: str, sp: bool, how: str) -> dict:
    import torch._dynamo as dynamo

    from lightning_tp.engine.compiled import compile_layers
    from lightning_tp.engine.loss import VocabShardedLogits
    from lightning_tp.policy import apply_policy

    torch.set_num_threads(1)
    group = _dist.mesh(2).tp_group
    eager, compiled = _model(kind), _model(kind)  # the same weights (same seed)
    for model in (eager, compiled):
        apply_policy(model, group, "auto", sequence_parallel=sp, verify=False)
    g = torch.Generator().manual_seed(1)
    idx, tgt = torch.randint(0, VOCAB, (2, SEQ), generator=g), torch.randint(0, VOCAB, (2, SEQ), generator=g)

    dynamo.reset()
    if how == "model":
        explained = dynamo.explain(lambda i: compiled(i).sum())(idx)
        compiled_fn = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    else:
        x = torch.randn(2, SEQ // 2 if sp else SEQ, 32, requires_grad=True)
        explained = dynamo.explain(lambda t: _blocks(compiled)[0](t).sum())(x)
        names = compile_layers(compiled, backend="aot_eager", fullgraph=True)
        assert names == [n for n, m in compiled.named_modules() if any(m is b for b in _blocks(compiled))], names
        compiled_fn = compiled
    out = {"graphs": explained.graph_count, "breaks": explained.graph_break_count,
           "reasons": [str(r.reason)[:300] for r in explained.break_reasons]}  # fmt: skip
    out["sharded_logits"] = isinstance(compiled_fn(idx), VocabShardedLogits)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=LR)
    opt_c = torch.optim.AdamW(compiled.parameters(), lr=LR)
    losses = []
    for step in range(2):  # the second step runs on updated weights (same graphs, no recompile)
        losses.append((_loss_backward(eager, idx, tgt), _loss_backward(compiled_fn, idx, tgt)))
        if step == 0:
            pairs = zip(eager.parameters(), compiled.parameters(), strict=True)
            out["grad_err"] = _rel((a.grad, b.grad) for a, b in pairs)
        opt_e.step(), opt_c.step()
        opt_e.zero_grad(), opt_c.zero_grad()
        if step == 0:
            # in units of the step size: Adam's first step is lr * g / (|g| + eps), so a gradient near eps that
            # differs in its last bits (fp32 order of operations) moves by a visible share of lr
            pairs = zip(eager.parameters(), compiled.parameters(), strict=True)
            out["weight_err"] = max(float((a - b).abs().max()) for a, b in pairs) / LR
    out["losses"] = losses
    return out


# the plain GPT without, nanoGPT (fused c_attn, its own attention code) with sequence parallelism
CASES = [("plain", False, "model"), ("nano", True, "model"), ("plain", False, "blocks"), ("nano", True, "blocks")]


def _run() -> dict:
    return {case: _case(*case) for case in CASES}


@pytest.fixture(scope="module")
def results():
    return _dist.run(2, _run)


@pytest.mark.parametrize("case", CASES, ids=[f"{k}-{'sp' if sp else 'tp'}-{how}" for k, sp, how in CASES])
def test_compiled_tp_model_has_no_graph_break_and_eager_values(results, case):
    kind, sp, how = case
    for rank, per_case in enumerate(results):
        r = per_case[case]
        where = f"{case}, rank {rank}"
        assert r["breaks"] == 0 and r["graphs"] == 1, (where, r["reasons"])
        for eager, compiled in r["losses"]:
            assert abs(compiled - eager) <= RTOL * abs(eager), (where, r["losses"])
        assert r["grad_err"] <= RTOL and r["weight_err"] <= STEP_TOL, (where, r["grad_err"], r["weight_err"])
        # whole model: dense logits inside the compiled region; blocks: the head stays eager and sharded
        assert r["sharded_logits"] == (how == "blocks"), where
