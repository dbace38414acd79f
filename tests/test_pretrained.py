"""Sharded pretrained loading: each rank reads its slices; equal to a dense load followed by sharding."""

from __future__ import annotations

import importlib.util
import warnings

import models
import pytest
import torch
from torch import nn

import _dist
from lightning_tp import CheckpointError, consolidate
from lightning_tp.engine.init import Materializer
from lightning_tp.engine.loss import gather_logits
from lightning_tp.engine.sharding import shard_spec
from lightning_tp.lightning.pretrained import load_pretrained
from lightning_tp.policy import apply_policy

HAS_HF = importlib.util.find_spec("transformers") is not None


class _Holder(nn.Module):
    """A LightningModule-like wrapper: its names carry a ``model.`` prefix the file does not have."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        out = self.model(ids)
        return getattr(out, "logits", out)


def _save(name: str, path, hf: bool):
    dense = models.build(name)
    if hf:
        dense.save_pretrained(path)  # model.safetensors (+ config.json)
    else:
        torch.save(dense.state_dict(), path)
    return dense


def _check_load(name: str, path: str, tp: int, deferred: bool):
    m = _dist.mesh(tp)
    dense = models.build(name)  # the same weights as saved (same seed)
    if deferred:
        with torch.device("meta"):
            model = _Holder(models.BUILDERS[name]())
        model = model.double()
        materializer = Materializer(model, "cpu", 0, initialize=False)
    else:
        model, materializer = _Holder(models.build(name, seed=99)), None  # other weights, overwritten
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_policy(model, m.tp_group, "auto", verify=False, materializer=materializer)
    n = load_pretrained(model, path, m.tp_rank)
    ref = dict(dense.named_parameters())
    for pname, p in model.named_parameters():
        full = ref[pname.removeprefix("model.")]
        spec = shard_spec(p)
        if spec is not None:
            owner = dense.get_submodule(pname.removeprefix("model.").rpartition(".")[0])
            conv1d = type(owner).__name__ == "Conv1D" and pname.endswith("weight")  # stores (in, out)
            full = spec.shard(full.t() if conv1d else full, m.tp_rank)
        assert torch.equal(p.detach(), full.detach()), pname
    ids = torch.randint(0, 30, (2, 8), generator=torch.Generator().manual_seed(0))
    got = gather_logits(model(ids))
    want = _Holder(dense)(ids)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    return n


CASES = [("plain_tied", False), pytest.param("hf_llama", True, marks=pytest.mark.skipif(not HAS_HF, reason="hf")),
         pytest.param("hf_llama_kv2", True, marks=pytest.mark.skipif(not HAS_HF, reason="hf")),
         pytest.param("hf_gpt2", True, marks=pytest.mark.skipif(not HAS_HF, reason="hf"))]  # fmt: skip


@pytest.mark.parametrize(("name", "hf"), CASES)
def test_sharded_load_equals_dense_load_then_shard(name, hf, tmp_path):
    """Into a meta-device model (no random init), and for the .pt case also into a built one."""
    path = tmp_path / ("hf" if hf else "weights.pt")
    _save(name, path, hf)
    for tp, deferred in ((2, True), (4, True), *(((2, False),) if not hf else ())):
        counts = _dist.run(4, _check_load, name, str(path), tp, deferred)
        assert len(set(counts)) == 1 and counts[0] > 0


def test_bad_pretrained_inputs_are_clear_errors(tmp_path):
    model = models.build("plain")
    state = model.state_dict()
    good = tmp_path / "good.pt"
    torch.save(state, good)
    assert load_pretrained(models.build("plain", seed=5), good, 0) == len(state)

    missing = tmp_path / "missing.pt"
    torch.save({k: v for k, v in state.items() if k != "norm.weight"}, missing)
    with pytest.raises(CheckpointError, match=r"missing keys \['norm\.weight'\]"):
        load_pretrained(models.build("plain"), missing, 0)

    extra = tmp_path / "extra.pt"
    torch.save({**state, "head2.weight": torch.zeros(2)}, extra)
    with pytest.raises(CheckpointError, match=r"unexpected keys \['head2\.weight'\]"):
        load_pretrained(models.build("plain"), extra, 0)

    wrong = tmp_path / "shape.pt"
    torch.save({**state, "norm.weight": torch.zeros(3, dtype=torch.float64)}, wrong)
    with pytest.raises(
        CheckpointError, match=r"shape.pt: 'norm.weight' has shape \[3\], the model's 'norm.weight' needs \[16\]"
    ):
        load_pretrained(models.build("plain"), wrong, 0)

    fp32_model = models.build("plain", dtype=torch.float32)
    before = {k: v.clone() for k, v in fp32_model.state_dict().items()}
    with pytest.raises(CheckpointError, match="torch.float64 and the model's .* is torch.float32: loading would lose"):
        load_pretrained(fp32_model, good, 0)  # float64 file into a float32 model
    assert all(torch.equal(v, before[k]) for k, v in fp32_model.state_dict().items())  # nothing half-loaded
    upcast = tmp_path / "fp32.pt"
    torch.save({k: v.float() for k, v in state.items()}, upcast)
    load_pretrained(models.build("plain"), upcast, 0)  # float32 file into a float64 model: fine

    with pytest.raises(CheckpointError, match="do not exist"):
        load_pretrained(models.build("plain"), tmp_path / "nope.pt", 0)


@pytest.mark.skipif(not HAS_HF, reason="hf extra")
def test_truncated_safetensors_is_a_clear_error(tmp_path):
    model = models.build("hf_llama")
    model.save_pretrained(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(_Holder(models.build("hf_llama")), tmp_path / "hf", 0)


def _save_hf_holder(path: str, name: str, inner: bool = False):
    from lightning_tp.lightning.checkpoint import save

    m = _dist.mesh(2)
    model = _Holder(models.build(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_policy(model.model if inner else model, m.tp_group, "auto", verify=False)
    with torch.no_grad():  # weights that differ from any fresh construction
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    save(path, model, [], m, {})
    ids = torch.randint(0, 30, (2, 8), generator=torch.Generator().manual_seed(0))
    return gather_logits(model(ids)).detach(), ids


@pytest.mark.skipif(not HAS_HF, reason="hf extra")
@pytest.mark.parametrize(("name", "inner"), [("hf_llama_tied", False), ("hf_gpt2", False), ("hf_gpt2", True)])
def test_hf_export_loads_with_from_pretrained(name, inner, tmp_path):
    """``inner``: the policy applied to the Hugging Face model inside the saved module (its Conv1D
    weights are still written (in, out))."""
    from transformers import AutoModelForCausalLM

    from lightning_tp import export

    logits, ids = _dist.run(2, _save_hf_holder, str(tmp_path / "ckpt"), name, inner)[0]
    out = export(tmp_path / "ckpt", tmp_path / "hf", format="hf", max_shard_bytes=20_000)  # several files
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files and "model.safetensors.index.json" in files and len(files) > 3
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    dense = {k.removeprefix("model."): v for k, v in consolidate(tmp_path / "ckpt").items()}
    for key, value in loaded.state_dict().items():  # every weight exactly as trained
        assert torch.equal(value, dense[key]), key
    # logits: the model computes its norms in float32, so the TP run and the dense one round differently
    torch.testing.assert_close(loaded(ids).logits, logits, rtol=1e-6, atol=1e-6)


def _save_plain(path: str):
    from lightning_tp.lightning.checkpoint import save

    m = _dist.mesh(2)
    model = models.build("plain")
    apply_policy(model, m.tp_group, "auto", verify=False)
    save(path, model, [], m, {})
    return True


def test_hf_export_without_a_hugging_face_model_is_a_clear_error(tmp_path):
    from lightning_tp import export

    _dist.run(2, _save_plain, str(tmp_path / "ckpt"))
    with pytest.raises(CheckpointError, match="holds no Hugging Face model"):
        export(tmp_path / "ckpt", tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()


def _hub_moe(arch: str):
    """A tiny Hugging Face mixture of experts with 12 experts (indices past 9 sort before 2 as text)."""
    import transformers

    kw = {"vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 4, "num_experts_per_tok": 2}  # fmt: skip
    if arch == "mixtral":
        return transformers.MixtralForCausalLM(
            transformers.MixtralConfig(intermediate_size=16, num_local_experts=12, **kw)
        )
    if arch == "gpt_oss":  # experts written as its 3-D parameters (the Hub's unquantized "BF16" layout)
        import hf_zoo

        return hf_zoo.gpt_oss(**kw, intermediate_size=16, num_local_experts=12, head_dim=8)
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=12, **kw
    ))  # fmt: skip


def _load_hub_moe(paths: dict, tp: int) -> dict:
    import hf_zoo
    import transformers

    m = _dist.mesh(tp)
    out = {}
    for arch, path in paths.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dense = transformers.AutoModelForCausalLM.from_pretrained(path)  # Hugging Face's own conversion
            with torch.device("meta"):
                model = _Holder(transformers.AutoModelForCausalLM.from_config(dense.config))
            policy = hf_zoo.POLICY.get(arch, "auto")  # GPT-OSS: "names" (its tp_plan splits only the embedding)
            apply_policy(
                model, m.tp_group, policy, verify=False, materializer=Materializer(model, "cpu", 0, initialize=False)
            )
        n = load_pretrained(model, path, m.tp_rank)
        wrong = []
        for name, p in model.named_parameters():
            full = dense.get_parameter(name.removeprefix("model."))
            spec = shard_spec(p)
            if not torch.equal(p.detach(), full.detach() if spec is None else spec.shard(full.detach(), m.tp_rank)):
                wrong.append(name)
        ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
        err = float((gather_logits(model(ids)) - dense(ids).logits).abs().max())
        experts = [n for n, p in model.named_parameters() if ".experts." in n and shard_spec(p) is not None]
        out[arch] = (n == len(dense.state_dict()), wrong, err, len(experts))
    return out


@pytest.mark.skipif(not HAS_HF, reason="hf")
def test_hub_layout_of_experts_loads_sharded(tmp_path):
    """A Hugging Face mixture of experts as `save_pretrained` writes it (the Hub's layout: one tensor per
    expert and projection, Mixtral's `block_sparse_moe` names) into a deferred model whose experts are
    3-D parameters split over TP: each rank reads its slices of every expert's tensors, and gets what
    Hugging Face's own `from_pretrained` conversion gives, sliced. GPT-OSS's experts (3-D in the file,
    gate/up interleaved, split under policy 'names') too, its down_proj_bias whole on every rank."""
    from safetensors import safe_open

    paths = {}
    for arch in ("mixtral", "qwen2_moe", "gpt_oss"):
        torch.manual_seed(0)
        paths[arch] = str(tmp_path / arch)
        _hub_moe(arch).save_pretrained(paths[arch])
        keys = list(safe_open(f"{paths[arch]}/model.safetensors", "pt").keys())
        per_expert = any(".experts.11." in k for k in keys) and not any("gate_up_proj" in k for k in keys)
        assert per_expert == (arch != "gpt_oss"), keys[:5]
    split = {"mixtral": 4, "qwen2_moe": 4, "gpt_oss": 6}  # GPT-OSS: gate_up_proj, its bias, down_proj per layer
    for rank_result in _dist.run(2, _load_hub_moe, paths, 2):
        for arch, (all_loaded, wrong, err, experts) in rank_result.items():
            assert all_loaded and not wrong and experts == split[arch], (arch, all_loaded, wrong, experts)
            assert err < 1e-5, (arch, err)  # float32 logits, experts summed over TP


def _converted_model(arch: str):
    import hf_zoo

    return hf_zoo.build("apertus", seed=0) if arch == "apertus" else hf_zoo.shrunk(arch, seed=0)


def _load_converted(paths: dict, tp: int) -> dict:
    import hf_zoo

    m = _dist.mesh(tp)
    out = {}
    for arch, path in paths.items():
        dense = _converted_model(arch)  # the model saved (same seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.device("meta"):
                model = _Holder(hf_zoo.from_config(dense.config).to(torch.float64))
            apply_policy(
                model, m.tp_group, "auto", verify=False, materializer=Materializer(model, "cpu", 0, initialize=False)
            )
        n = load_pretrained(model, path, m.tp_rank)
        wrong = []
        for name, p in model.named_parameters():
            full = dense.get_parameter(name.removeprefix("model.")).detach()
            spec = shard_spec(p)
            if not torch.equal(p.detach(), full if spec is None else spec.shard(full, m.tp_rank)):
                wrong.append(name)
        ids = torch.randint(3, 60, (2, 8), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            err = float((gather_logits(model(ids)) - dense(ids).logits).abs().max())
        out[arch] = (n, wrong, err)
    return out


@pytest.mark.skipif(not HAS_HF, reason="hf")
def test_hub_conversions_that_join_or_cut_tensors_load_sharded(tmp_path):
    """Hugging Face checkpoints whose tensors the model holds joined or cut (its conversion mapping):
    OLMo-Hybrid's q/k/v conv1d kernels concatenated into one, HRM's fused gate/q/k/v projection
    chunked into four, Sarvam-MoE's query_key_value split by the model's grouped-query sizes (and its
    per-expert tensors stacked), and Apertus's learned 0-dim scalars: each rank reads its slices into a
    meta-device model split at TP 2 and holds exactly the saved model's weights, sliced."""
    from safetensors import safe_open

    hub_keys = {"olmo_hybrid": "linear_attn.q_conv1d.weight", "hrm_text": "attn.gqkv_proj.weight",
                "sarvam_moe": "attention.query_key_value.weight", "apertus": "act_fn.beta"}  # fmt: skip
    paths = {}
    for arch, key in hub_keys.items():
        paths[arch] = str(tmp_path / arch)
        _converted_model(arch).save_pretrained(paths[arch])
        with safe_open(f"{paths[arch]}/model.safetensors", "pt") as f:
            assert any(k.endswith(key) for k in f.keys()), arch  # the Hub's layout, which the model does not hold
    for rank_result in _dist.run(2, _load_converted, paths, 2):
        for arch, (n, wrong, err) in rank_result.items():
            assert n > 0 and not wrong, (arch, wrong)
            assert err < 1e-6, (
                arch,
                err,
            )  # float32 inside the models (norms, routers) rounds the split run differently


def test_joined_and_cut_views_read_the_slices_of_the_tensor_they_stand_for(tmp_path):
    """The views a conversion builds read any slice along any dim as the joined (cut) tensor would give it."""
    from safetensors.torch import save_file

    from lightning_tp.lightning.pretrained import _Joined, _Piece, _Source

    g = torch.Generator().manual_seed(0)
    parts = {k: torch.randn(n, 6, generator=g) for k, n in (("a", 3), ("b", 5), ("c", 2))}
    save_file(parts, str(tmp_path / "w.safetensors"))
    src = _Source(tmp_path / "w.safetensors")
    for dim, keys in ((0, ("a", "b", "c")), (1, ("a", "a"))):  # (along columns: parts with equal rows)
        joined = _Joined([(src, k) for k in keys], dim)
        full = torch.cat([parts[k] for k in keys], dim=dim)
        assert joined.shape() == tuple(full.shape) and torch.equal(joined.read(), full)
        for d in (0, 1):
            for start in range(full.shape[d]):
                for n in range(1, full.shape[d] - start + 1):
                    assert torch.equal(joined.read(None, d, start, n), full.narrow(d, start, n)), (dim, d, start, n)
    for dim, offset, size in ((0, 1, 3), (1, 2, 4)):
        piece = _Piece(src, "b", dim, offset, size)
        full = parts["b"].narrow(dim, offset, size)
        assert piece.shape() == tuple(full.shape) and torch.equal(piece.read(), full)
        for d in (0, 1):  # along its own dim (an offset) and across it (two ranges at once)
            for start in range(full.shape[d]):
                n = full.shape[d] - start
                assert torch.equal(piece.read(None, d, start, n), full.narrow(d, start, n)), (dim, d, start)
