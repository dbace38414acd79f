"""Every causal-LM architecture the installed transformers registers, under policy="auto", against its
dense copy (float64): ``python tests/scripts/hf_sweep.py [--tp 2] [--sp] [--no-float32] [--policy names] [arch ...]``.

Each architecture is built from its default config shrunk to a tiny model (2 layers, hidden 64, 8 heads,
4 key/value heads, 4 experts; every dropout and router jitter 0; eager attention and experts), then
rewritten at ``--tp`` and compared as ``tests/test_hf_models.py`` does (logits, every gradient, the
``labels=`` loss, a mixture of experts' load-balancing loss; with ``--sp`` also a no-grad forward of an
odd length). Outcomes: ``exact``, ``refused`` (a lightning_tp-typed error naming the module), ``wrong``
(a silent difference: a defect), ``error`` (an untyped exception: a defect), ``skip`` (the tiny config
does not build or run dense: composite, audio or vision configs, layouts the shrinking breaks).

Many models compute parts in float32 inside a float64 model (norms, routers, rotary): their differences
are float32 rounding, ~1e-7. ``--no-float32`` makes ``Tensor.float()``, ``.to(torch.float32)``,
``.type(torch.float32)`` and softmax's ``dtype=torch.float32`` keep float64 on every rank and in the
dense model, so those models must be exact too. Not part of the suite (about 15 minutes on 2 cores);
the architectures that matter most are tests in ``tests/test_hf_models.py``. Exit status 1 when any
architecture is ``wrong`` or ``error``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]  # tests/: _dist, test_hf_models

import _dist  # noqa: E402

SLOW = {"blt", "phi4_multimodal"}  # their default sub-configs build multi-GB models


@contextlib.contextmanager
def float64_casts():
    """Within: float32 casts of float64 tensors keep float64 (see the module doc)."""
    import torch.nn.functional as F

    to, typ, softmax, t_softmax, flt = torch.Tensor.to, torch.Tensor.type, F.softmax, torch.softmax, torch.Tensor.float
    m_softmax = torch.Tensor.softmax

    def f64(x, dtype):
        return torch.float64 if dtype is torch.float32 and x.dtype == torch.float64 else dtype

    def _to(self, *args, **kwargs):
        if self.dtype == torch.float64:
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
            kwargs = {k: f64(self, v) if k == "dtype" else v for k, v in kwargs.items()}
        return to(self, *args, **kwargs)

    def _type(self, dtype=None, *args, **kwargs):
        return typ(self) if dtype is None else typ(self, f64(self, dtype), *args, **kwargs)

    torch.Tensor.to, torch.Tensor.type = _to, _type
    torch.Tensor.float = lambda self, *a, **k: self if self.dtype == torch.float64 else to(self, torch.float32)
    F.softmax = lambda x, dim=None, _stacklevel=3, dtype=None: softmax(x, dim=dim, dtype=f64(x, dtype))
    torch.softmax = lambda x, dim, dtype=None: t_softmax(x, dim, dtype=f64(x, dtype))
    torch.Tensor.softmax = lambda self, dim, dtype=None: m_softmax(self, dim, dtype=f64(self, dtype))
    try:
        yield
    finally:
        torch.Tensor.softmax = m_softmax
        torch.Tensor.to, torch.Tensor.type, F.softmax, torch.softmax, torch.Tensor.float = (
            to,
            typ,
            softmax,
            t_softmax,
            flt,
        )


def init_differences(eager: torch.nn.Module, other: torch.nn.Module, deferred: torch.nn.Module) -> list[str]:
    """How ``deferred`` (built on the meta device and materialized) differs from the eager builds
    ``eager`` and ``other`` (the same config, two seeds): a tensor both eager builds hold alike
    (computed buffers, sinusoids, constants) must be the same under deferred init (float32 rounding
    allowed: the eager models may have been built in float32 and cast); every other floating one of
    256 elements or more must have the eager spread (std within 0.7x to 1.4x: a different
    initializer, not a different draw); every other one must be finite."""
    a, b = (dict((*m.named_parameters(), *m.named_buffers())) for m in (eager, other))
    wrong = []
    for name, got in (*deferred.named_parameters(), *deferred.named_buffers()):
        got, ref = got.detach(), a.get(name)
        ref = ref.detach().to(got.dtype) if ref is not None and ref.shape == got.shape else None
        if ref is not None and torch.equal(ref, b[name].detach().to(got.dtype)):
            if not torch.allclose(got, ref, rtol=1e-6, atol=1e-7):  # (infinite bounds too)
                wrong.append(f"{name}: not what every eager build gives")
            continue
        if got.is_floating_point() and not torch.isfinite(got).all():
            wrong.append(f"{name}: not finite")
        elif ref is not None and got.is_floating_point() and got.numel() >= 256:
            want, have = ref.double().std().item(), got.double().std().item()
            if not 0.7 * want <= have <= 1.4 * want:
                wrong.append(f"{name}: std {have:.3g}, eager {want:.3g}")
    return wrong


def _case(arch: str, tp: int, sequence_parallel: bool) -> dict:
    import hf_zoo
    import test_hf_models as T

    mesh = _dist.mesh(tp)
    try:
        dense = hf_zoo.shrunk(arch)
        vocab = min(dense.config.vocab_size, 128)
        kwargs = {"input_ids": torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(0))}
        tgt = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    except Exception as exc:  # noqa: BLE001 - reported
        return {"status": "skip", "message": f"{type(exc).__name__}: {str(exc)[:160]}"}
    try:
        return T._exactness(arch, dense, mesh, kwargs, tgt, sequence_parallel)
    except Exception as exc:  # noqa: BLE001 - reported
        return {"status": "error", **T._error_info(exc), "traceback": traceback.format_exc()[-2000:]}


def _run(archs: list[str], tp: int, sequence_parallel: bool, no_float32: bool, policy: str) -> dict[str, dict]:
    import hf_zoo

    warnings.simplefilter("ignore")
    hf_zoo.POLICY.update(dict.fromkeys(archs, policy))  # the policy _exactness rewrites each with
    with float64_casts() if no_float32 else contextlib.nullcontext():
        return {arch: _case(arch, tp, sequence_parallel) for arch in archs}


def _line(arch: str, res: dict) -> str:
    status = res["status"]
    if status in ("exact", "wrong"):
        what = "" if status == "exact" else f"{res['what']}: {res['detail']}; "
        return (
            f"{arch:28s} {status:8s} {what}logits {res['logit_err']:.1e}, grads {res.get('grad_err', float('nan')):.1e}"
        )
    return f"{arch:28s} {status:8s} {res.get('type', '')} {res['message'][:200]}".replace("\n", " ")


def arguments(doc: str) -> argparse.ArgumentParser:
    """The options every sweep takes: architectures, ``--sp``, ``--no-float32``, ``--verbose``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("archs", nargs="*", help="model types (default: every causal LM registered)")
    parser.add_argument("--sp", action="store_true", help="sequence_parallel=True")
    parser.add_argument("--no-float32", action="store_true", help="float32 casts keep float64 (see hf_sweep.py)")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of each error")
    return parser


def chosen(args: argparse.Namespace) -> list[str]:
    """The architectures to sweep: those named, or every causal LM registered (less :data:`SLOW`)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    os.environ.setdefault("WANDB_MODE", "offline")
    return args.archs or sorted(a for a in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if a not in SLOW)


def main() -> int:
    parser = arguments(__doc__)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--policy", default="auto", help="'auto' (default) or 'names'")
    args = parser.parse_args()

    def line(arch: str, res: dict) -> str:
        return _line(arch, res) + (f"\n{res['traceback']}" if args.verbose and "traceback" in res else "")

    return sweep(args.tp, _run, chosen(args), (args.tp, args.sp, args.no_float32, args.policy), line=line)


def sweep(world: int, fn, archs: list[str], args: tuple, line=_line, timeout: int = 600) -> int:
    """``fn(batch, *args) -> {arch: result}`` on every rank of a ``world``-rank world, a few
    architectures per call (one that hangs or dies costs its batch only); prints ``line(arch, result)``
    for each and the counts. Returns 1 when any architecture is ``wrong`` or an ``error``."""
    results: dict[str, dict] = {}
    for i in range(0, len(archs), 6):
        batch = archs[i : i + 6]
        try:
            results.update(_dist.run(world, fn, batch, *args, timeout=timeout)[0])
        except BaseException as exc:  # noqa: BLE001 - reported per architecture
            results.update({a: {"status": "error", "type": type(exc).__name__, "message": str(exc)} for a in batch})
        for arch in batch:
            print(line(arch, results[arch]), flush=True)
    _dist.close_all()
    counts = {
        s: sum(r["status"] == s for r in results.values()) for s in ("exact", "refused", "wrong", "error", "skip")
    }
    print(counts)
    return int(counts["wrong"] > 0 or counts["error"] > 0)


if __name__ == "__main__":
    sys.exit(main())
