"""Every causal-LM architecture the installed transformers registers, split at TP 2 and then over DP 2
with ZeRO (torch's FSDP2, as ``MegatronTPStrategy(zero_stage=...)`` does), against its dense copy
(float64): ``python tests/scripts/hf_zero_sweep.py [--stage 3] [--sp] [--no-float32] [arch ...]``.

Each architecture (shrunk as in ``hf_sweep.py``) is rewritten with its policy on the TP group of a
4-rank world, ``fully_shard``-ed layer by layer over the DP group, and each DP rank runs forward and
backward on its half of a batch of 4. Its gradients (reduce-scattered over DP by FSDP2, partial ones
summed over TP as the strategy's precision plugin does) are gathered whole and compared with the dense
model's gradients of the mean of the two halves' losses; then one AdamW step each, and the weights are
compared. Outcomes as in ``hf_sweep.py``. Not part of the suite (4 processes on 2 cores: slow).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import hf_sweep  # noqa: E402

import _dist  # noqa: E402

TOL = 1e-9  # relative to the largest entry (float64, float32 casts kept float64 with --no-float32: 1e-12 measured)


def _whole(param, tensor, tp_group):
    """``tensor`` (``param``'s gradient or value, a DTensor over DP under ZeRO) gathered whole."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return _dist.gathered(param, tensor, tp_group)


LR, EPS = 1e-2, 1e-8  # the AdamW step both models take


def _compare(dense, model, tp_group, what: str, slack: dict[str, torch.Tensor]) -> tuple[float, list[str]]:
    """The worst relative difference of ``what`` (``"grad"`` or ``"weight"``) and the parameters past
    :data:`TOL`. Comparing gradients fills ``slack``: how far one AdamW step may carry each weight
    apart given the gradients' difference. A first step moves a weight by ``LR * g / (|g| + EPS)``, so
    where the true gradient is about 0 (a key bias: softmax ignores it) a rounding-level difference
    ``dg`` in ``g`` is amplified by up to ``LR / EPS``; the bound is ``LR * EPS * |dg| / (|g| + EPS)**2``."""
    import test_hf_models as T

    worst, wrong = 0.0, []
    ref = dict(dense.named_parameters())
    for name, p in model.named_parameters():  # the same order on every rank: the collectives match
        mine = p.grad if what == "grad" else p.detach()
        theirs = ref[name].grad if what == "grad" else ref[name].detach()
        if mine is None or theirs is None:
            if (mine is None) != (theirs is None):
                wrong.append(f"{name}: {what} {'missing' if mine is None else 'where dense has none'}")
            continue
        got = _whole(p, mine, tp_group)
        if name.endswith("weight") and T._is_conv1d(dense, name) and not T._is_conv1d(model, name):
            theirs = theirs.t()  # a Conv1D stores (in, out); the rewritten layer (out, in)
        if got.shape != theirs.shape:
            wrong.append(f"{name}: {what} shape {tuple(got.shape)} != {tuple(theirs.shape)}")
            continue
        scale = max(1e-6, float(theirs.abs().max()))
        diff = (got - theirs).abs()
        if what == "grad":
            slack[name] = LR * EPS * diff / (theirs.abs() + EPS) ** 2
        else:  # what the step's amplification of the gradients' difference explains
            diff = (diff - 1.01 * slack.get(name, torch.zeros_like(diff))).clamp(min=0)
        err = float(diff.max()) / scale
        worst = max(worst, err)
        if err > TOL:
            wrong.append(f"{name}: {what} error {err:.2e}")
    return worst, wrong


def _case(arch: str, stage: int, sequence_parallel: bool) -> dict:
    import hf_zoo
    import test_hf_models as T

    from lightning_tp.errors import LightningTPError
    from lightning_tp.lightning.precision import all_reduce_partial_grads
    from lightning_tp.lightning.zero import dp_mesh, dp_shard
    from lightning_tp.policy import apply_policy

    mesh = _dist.mesh(2)
    try:
        dense = hf_zoo.shrunk(arch)
        vocab = min(dense.config.vocab_size, 128)
        g = torch.Generator().manual_seed(0)
        ids, tgt = torch.randint(3, vocab, (4, 12), generator=g), torch.randint(3, vocab, (4, 12), generator=g)
    except Exception as exc:  # noqa: BLE001 - reported
        return {"status": "skip", "message": f"{type(exc).__name__}: {str(exc)[:160]}"}

    def loss(net, rows):
        logits = net(input_ids=ids[rows]).logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt[rows].reshape(-1))

    try:
        model = copy.deepcopy(dense)
        apply_policy(
            model, mesh.tp_group, hf_zoo.POLICY.get(arch, "auto"), verify=True, example_input={"input_ids": ids[:2]},
            sequence_parallel=sequence_parallel,
        )  # fmt: skip
    except LightningTPError as exc:
        return {"status": "refused", **T._error_info(exc)}
    try:
        dp_shard(model, dp_mesh(mesh.dp_group, "cpu"), stage)
        half = slice(2 * mesh.dp_rank, 2 * mesh.dp_rank + 2)
        loss(model, half).backward()
        all_reduce_partial_grads(list(model.parameters()), mesh.tp_group)
        ((loss(dense, slice(0, 2)) + loss(dense, slice(2, 4))) / 2).backward()
        slack: dict[str, torch.Tensor] = {}
        grad_err, wrong = _compare(dense, model, mesh.tp_group, "grad", slack)
        for net in (dense, model):
            torch.optim.AdamW(net.parameters(), lr=LR, eps=EPS, weight_decay=0.1).step()
        weight_err, wrong_w = _compare(dense, model, mesh.tp_group, "weight", slack)
    except Exception as exc:  # noqa: BLE001 - reported
        return {"status": "error", **T._error_info(exc), "traceback": traceback.format_exc()[-2000:]}
    wrong += wrong_w
    info = {"logit_err": 0.0, "grad_err": grad_err, "weight_err": weight_err}
    if wrong:
        return {"status": "wrong", "what": wrong[0].split(":")[0], "detail": "; ".join(wrong[:3]), **info}
    return {"status": "exact", **info}


def _run(archs: list[str], stage: int, sp: bool, no_float32: bool) -> dict[str, dict]:
    warnings.simplefilter("ignore")
    with hf_sweep.float64_casts() if no_float32 else contextlib.nullcontext():
        return {arch: _case(arch, stage, sp) for arch in archs}


def main() -> int:
    parser = hf_sweep.arguments(__doc__)
    parser.add_argument("--stage", type=int, default=3, choices=(2, 3))
    args = parser.parse_args()
    archs = hf_sweep.chosen(args)

    def line(arch: str, res: dict) -> str:
        extra = f", weights {res['weight_err']:.1e}" if "weight_err" in res else ""
        trace = f"\n{res['traceback']}" if args.verbose and "traceback" in res else ""
        return hf_sweep._line(arch, res).replace("logits 0.0e+00, ", "") + extra + trace

    return hf_sweep.sweep(4, _run, archs, (args.stage, args.sp, args.no_float32), line=line, timeout=900)


if __name__ == "__main__":
    sys.exit(main())
