"""Deferred (meta-device) init against eager construction, for every architecture the installed
transformers builds: ``python tests/scripts/hf_init_sweep.py [--all] [arch ...]``.

Each architecture (its default config shrunk as ``hf_zoo.shrunk`` does; ``--all``: every model type
``AutoModel`` builds, encoders, encoder-decoders, speech and vision included, not only the causal LMs)
is built eagerly under two seeds, and on the meta device, then materialized by
:class:`~lightning_tp.engine.init.Materializer` with no split (the TP independence of the values is
``hf_deferred_sweep.py``'s). :func:`hf_sweep.init_differences` compares them: every tensor the two
eager builds agree on (computed buffers, sinusoids, constants) must be what deferred init gives, and
every other one must have the eager spread. Outcomes: ``exact``, ``refused`` (a ``DeferredInitError``
naming what only a constructor sets), ``wrong`` (a silent difference: a defect, or Hugging Face's own,
see :data:`HF_OWN`), ``error``, ``skip`` (the shrunk config does not build, or a composite model over
30M parameters). One process; not part of the suite (about 8 minutes with ``--all`` on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import hf_sweep  # noqa: E402

# Where the eager build is what differs: Hugging Face's own bug, deferred init gives the intended values.
HF_OWN = {
    "vit_mae": "eager, ViTMAEEmbeddings.initialize_weights returns early (its patch projection's module is "
    "already flagged _is_hf_initialized), so its sin-cos position embedding and cls token stay as constructed (zeros); deferred init gives them",
}


def _built(auto, config, seed: int | None) -> torch.nn.Module:
    if seed is None:
        with torch.device("meta"):
            return auto.from_config(config)
    torch.manual_seed(seed)
    return auto.from_config(config)


def _case(arch: str, auto) -> dict:
    import hf_zoo

    from lightning_tp import DeferredInitError
    from lightning_tp.engine.init import Materializer
    from lightning_tp.errors import few

    try:
        for config in hf_zoo.shrunk_configs(arch):
            try:
                meta = _built(auto, config, None)
                break
            except Exception:  # noqa: BLE001 - the next, smaller set of overrides
                continue
        else:
            raise RuntimeError("no shrunk config builds")
        if sum(p.numel() for p in meta.parameters()) > 30e6:
            raise RuntimeError("over 30M parameters shrunk (a composite config)")
        eager, other = _built(auto, config, 0), _built(auto, config, 1)
    except Exception as exc:  # noqa: BLE001 - reported
        return {"status": "skip", "message": f"{type(exc).__name__}: {str(exc)[:160]}"}
    try:
        m = Materializer(meta, "cpu", 1234)
        for name, unit, recurse in m.units():
            m.materialize(name, unit, recurse)
        m.finish()
    except DeferredInitError as exc:
        return {"status": "refused", "type": "DeferredInitError", "message": str(exc)}
    except Exception as exc:  # noqa: BLE001 - reported
        return {"status": "error", "type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
    wrong = hf_sweep.init_differences(eager, other, meta)
    if not wrong:
        return {"status": "exact", "message": ""}
    if arch in HF_OWN:
        return {"status": "skip", "message": f"Hugging Face's own: {HF_OWN[arch]} ({few(wrong)})"}
    return {"status": "wrong", "message": few(wrong)}


def _run(archs: list[str], all_models: bool) -> dict[str, dict]:
    from transformers import AutoModel, AutoModelForCausalLM

    warnings.simplefilter("ignore")
    return {arch: _case(arch, AutoModel if all_models else AutoModelForCausalLM) for arch in archs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archs", nargs="*", help="model types (default: every causal LM registered)")
    parser.add_argument("--all", action="store_true", help="every model type AutoModel builds")
    args = parser.parse_args()
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    archs = args.archs or (
        sorted(a for a in MODEL_MAPPING_NAMES if a not in hf_sweep.SLOW) if args.all else hf_sweep.chosen(args)
    )

    def line(arch: str, res: dict) -> str:
        return f"{arch:28s} {res['status']:8s} {res.get('type', '')} {res['message'][:300]}".replace("\n", " ")

    return hf_sweep.sweep(1, _run, archs, (args.all,), line=line, timeout=900)


if __name__ == "__main__":
    sys.exit(main())
