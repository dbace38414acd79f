"""Every causal-LM architecture the installed transformers registers, built on the meta device and
loaded from its own ``save_pretrained`` directory, against the model saved (float64): ``python tests/scripts/hf_deferred_sweep.py [--tp 2] [--sp] [--no-float32] [--policy names] [arch ...]``.

For each architecture (shrunk as in ``hf_sweep.py``), on every rank:

1. **init**: the model built under ``torch.device("meta")`` and rewritten with deferred init
   (:class:`~lightning_tp.engine.init.Materializer`, each layer initialized dense and sliced) gathers to
   exactly the weights and buffers the same materializer gives without any split (TP independence),
   and those match eager construction (``hf_sweep.init_differences``: what two eager builds under
   different seeds agree on, computed buffers such as ``inv_freq``, masks, constants, sinusoids, is
   what deferred init gives; every other tensor has the eager spread).
2. **pretrained**: ``save_pretrained`` writes the dense model (the Hub's layout: experts one tensor each);
   a meta-device copy is rewritten, loads its slices (``load_pretrained``) and passes the block-by-block
   verify (``--sp``: under sequence parallelism), then is compared with the model saved as
   ``hf_sweep.py`` compares (logits, every gradient, the ``labels=`` loss, the load-balancing loss).
3. **export**: the loaded model is saved as a lightning_tp checkpoint and exported ``format="hf"``;
   ``from_pretrained`` of the export equals the reference tensor for tensor.

Outcomes as in ``hf_sweep.py`` (``exact``, ``refused``, ``wrong``, ``error``, ``skip``). Where Hugging
Face's own save/load round trip does not give the model back, step 3 is left out (``[export not
checked]``). Not part of the suite (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import hf_sweep  # noqa: E402

import _dist  # noqa: E402


def _meta_copy(config) -> nn.Module:
    import hf_zoo

    with torch.device("meta"):
        model = hf_zoo.from_config(config)
    return model.to(torch.float64).train()


def _gathered(model: nn.Module, group) -> dict[str, torch.Tensor]:
    """Every parameter of a rewritten model, dense (collective, in the same order on every rank)."""
    import test_hf_models as T

    return {n: T._gather_grad(p, p.detach(), group) for n, p in model.named_parameters()}


def _check_init(dense: nn.Module, other: nn.Module, group, policy: str) -> list[str]:
    """Deferred init (step 1): the differences found, as text. ``other``: ``dense`` built under another seed."""
    from lightning_tp.engine.init import Materializer
    from lightning_tp.policy import apply_policy

    whole = _meta_copy(dense.config)
    m = Materializer(whole, "cpu", 1234)
    for name, unit, recurse in m.units():
        m.materialize(name, unit, recurse)
    m.finish()
    wrong = hf_sweep.init_differences(dense, other, whole)
    split = _meta_copy(dense.config)
    apply_policy(split, group, policy, verify=False, materializer=Materializer(split, "cpu", 1234))
    got = _gathered(split, group)
    for name, p in whole.named_parameters():
        want = p.detach().t() if hf_sweep_conv1d(dense, split, name) else p.detach()
        if name not in got or got[name].shape != want.shape or not torch.equal(got[name], want):
            wrong.append(f"init of {name} depends on TP")
    unsplit = dict(whole.named_buffers())
    for name, b in split.named_buffers():
        ref = unsplit.get(name)
        if ref is not None and (b.shape != ref.shape or not torch.equal(b, ref)):
            wrong.append(f"buffer {name} depends on TP")
    return wrong


def hf_sweep_conv1d(dense: nn.Module, split: nn.Module, name: str) -> bool:
    """A GPT-2 ``Conv1D`` weight (stored (in, out)) that the rewrite made a linear layer's (out, in)."""
    import test_hf_models as T

    return name.endswith("weight") and T._is_conv1d(dense, name) and not T._is_conv1d(split, name)


def _case(arch: str, tp: int, tmp: str, no_float32: bool, sequence_parallel: bool = False) -> dict:
    import hf_zoo
    from transformers import AutoModelForCausalLM

    mesh = _dist.mesh(tp)
    policy = hf_zoo.POLICY.get(arch, "auto")
    here = Path(tmp) / arch  # one directory: Hugging Face writes a config from the first process only
    load = {"dtype": torch.float64, "attn_implementation": "eager"}
    try:
        dense = hf_zoo.shrunk(arch)
        vocab = min(dense.config.vocab_size, 128)
        kwargs = {"input_ids": torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(0))}
        tgt = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
        if torch.distributed.get_rank() == 0:
            dense.save_pretrained(here / "dense")
        torch.distributed.barrier()
        try:
            ref = AutoModelForCausalLM.from_pretrained(here / "dense", experts_implementation="eager", **load)
        except TypeError:
            ref = AutoModelForCausalLM.from_pretrained(here / "dense", **load)
        ref.train()
        with torch.no_grad():
            if not torch.equal(ref(**kwargs).logits, dense(**kwargs).logits):
                ref = None  # Hugging Face's own save/load round trip does not give the model back: no step 3
    except Exception as exc:  # noqa: BLE001 - reported
        return {"status": "skip", "message": f"{type(exc).__name__}: {str(exc)[:160]}"}
    with hf_sweep.float64_casts() if no_float32 else contextlib.nullcontext():  # after Hugging Face's round trip
        return _steps(arch, dense, ref, mesh, kwargs, tgt, policy, here, sequence_parallel)


def _steps(arch, dense, ref, mesh, kwargs, tgt, policy, here: Path, sequence_parallel: bool) -> dict:
    """Steps 1 to 3."""
    import hf_zoo
    import test_hf_models as T

    from lightning_tp.errors import LightningTPError

    try:  # step 1; steps 2 and 3 run whatever it finds (their status, with this one's "init" beside it)
        wrong = _check_init(dense, hf_zoo.shrunk(arch, seed=1), mesh.tp_group, policy)
        init = {"status": "wrong", "detail": "; ".join(wrong[:4])} if wrong else {"status": "exact"}
    except LightningTPError as exc:
        init = {"status": "refused", **T._error_info(exc)}
    except Exception as exc:  # noqa: BLE001 - reported
        init = {"status": "error", **T._error_info(exc), "traceback": traceback.format_exc()[-2000:]}
    res = _pretrained_and_export(arch, dense, ref, mesh, kwargs, tgt, policy, here, sequence_parallel)
    res["init"] = init
    if res["status"] in ("exact", "refused") and init["status"] in ("wrong", "error"):
        return {
            **res,
            "status": init["status"],
            "what": "deferred init",
            "detail": init.get("detail", init.get("message")),
        }
    return res


def _pretrained_and_export(arch, dense, ref, mesh, kwargs, tgt, policy, here: Path, sequence_parallel: bool) -> dict:
    """Steps 2 and 3: the loaded model against the model saved (``dense``: Hugging Face's ``from_pretrained``
    keeps some modules in float32 and unfreezes frozen position tables), its export against ``ref``,
    Hugging Face's own load of the saved directory."""
    import test_hf_models as T
    from transformers import AutoModelForCausalLM

    from lightning_tp import export
    from lightning_tp.engine.init import Materializer
    from lightning_tp.lightning.checkpoint import save
    from lightning_tp.lightning.pretrained import load_pretrained
    from lightning_tp.policy import apply_policy

    rank = mesh.tp_rank
    load = {"dtype": torch.float64, "attn_implementation": "eager"}

    def rewrite(group):
        model = _meta_copy(dense.config)
        plan = apply_policy(
            model, group, policy, verify=True, example_input=kwargs, sequence_parallel=sequence_parallel,
            materializer=Materializer(model, "cpu", 0, initialize=False),
            load_weights=lambda m: load_pretrained(m, here / "dense", rank),
        )  # fmt: skip
        rewrite.model = model
        return model, plan

    try:
        res = T._exactness(arch, dense, mesh, kwargs, tgt, sequence_parallel, rewrite=rewrite)
    except Exception as exc:  # noqa: BLE001 - reported
        return {
            "status": "error",
            "stage": "pretrained",
            **T._error_info(exc),
            "traceback": traceback.format_exc()[-2000:],
        }
    if res["status"] != "exact" or ref is None:
        return {**res, "export": "not checked"} if ref is None else res
    try:  # export the loaded model and load it with Hugging Face: what it made of the saved directory
        holder = nn.Module()
        holder.model = rewrite.model
        ckpt = here / "ckpt"  # the same path on every rank: one checkpoint
        save(ckpt, holder, [], mesh, {})
        out = export(ckpt, here / f"export{rank}", format="hf")
        back = AutoModelForCausalLM.from_pretrained(out, **load)
        want = ref.state_dict()
        got = back.state_dict()
        diff = [k for k in want if k not in got or got[k].shape != want[k].shape or not torch.equal(got[k], want[k])]
        if diff or set(got) != set(want):
            return {
                "status": "wrong",
                "what": "export",
                "detail": f"differs: {diff[:4]}, extra {sorted(set(got) - set(want))[:4]}",
                "logit_err": res["logit_err"],
            }
    except Exception as exc:  # noqa: BLE001 - reported
        return {"status": "error", "stage": "export", **T._error_info(exc), "traceback": traceback.format_exc()[-2000:]}
    return res


def _run(archs: list[str], tp: int, no_float32: bool, policy: str, tmp: str, sp: bool = False) -> dict[str, dict]:
    import hf_zoo

    warnings.simplefilter("ignore")
    hf_zoo.POLICY.update(dict.fromkeys(archs, policy))
    return {arch: _case(arch, tp, tmp, no_float32, sp) for arch in archs}


def main() -> int:
    parser = hf_sweep.arguments(__doc__)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--policy", default="auto", help="'auto' (default) or 'names'")
    args = parser.parse_args()
    archs = hf_sweep.chosen(args)

    def line(arch: str, res: dict) -> str:
        init = res.get("init", {})
        note = f" [{res['stage']}]" if "stage" in res else ""
        if init.get("status") == "refused":
            note += f" [init {init['status']}: {init.get('type', '')} {init.get('message', '')[:200]}]"
        note += " [export not checked]" if "export" in res else ""
        trace = f"\n{res['traceback']}" if args.verbose and "traceback" in res else ""
        return hf_sweep._line(arch, res) + note + trace

    with tempfile.TemporaryDirectory() as tmp:
        return hf_sweep.sweep(
            args.tp, _run, archs, (args.tp, args.no_float32, args.policy, tmp, args.sp), line=line, timeout=900
        )


if __name__ == "__main__":
    sys.exit(main())
