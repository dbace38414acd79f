"""Megatron sequence parallelism through the policy: float64 parity with the unsharded model."""

import copy
import importlib.util
import math
import warnings

import models
import pytest
import torch

import _dist
from lightning_tp import ShardingError, gather_logits
from lightning_tp.engine.sequence import SequenceShardedEmbedding
from lightning_tp.engine.sharding import has_partial_grad, shard_spec
from lightning_tp.lightning.precision import all_reduce_partial_grads
from lightning_tp.policy import PolicyError, PolicyWarning, apply_policy, hf_plan, plan_policy, translate_hf_plan
from lightning_tp.policy.verify import PolicyMismatchError

HAS_HF = importlib.util.find_spec("transformers") is not None
TOL = {"atol": 1e-10, "rtol": 0.0}


def _counting_collectives():
    import torch.distributed as dist

    counts: dict[str, int] = {}
    names = (
        "all_reduce",
        "all_gather_into_tensor",
        "reduce_scatter_tensor",
        "all_gather_single",
        "reduce_scatter_single",
    )
    real = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def wrap(name):
        def counted(*a, **k):
            counts[name] = counts.get(name, 0) + 1
            return real[name](*a, **k)

        return counted

    for n in real:
        setattr(dist, n, wrap(n))
    return counts, lambda: [setattr(dist, n, f) for n, f in real.items()]


def _counted_forward(model, ids):
    """``model(ids)`` and the collectives it ran, by name."""
    counts, restore = _counting_collectives()
    try:
        return model(ids), counts
    finally:
        restore()


def _assert_grads_match_dense(model, dense, m):
    """Every gradient (partial ones summed over TP first) equals this rank's part of the dense model's."""
    all_reduce_partial_grads(list(model.parameters()), m.tp_group)
    for pname, param in model.named_parameters():
        ref = dense.get_parameter(pname).grad
        spec = shard_spec(param)
        ref = ref if spec is None else spec.shard(ref, m.tp_rank)
        torch.testing.assert_close(param.grad, ref, **TOL, msg=lambda s, n=pname: f"{n}: {s}")


def _forwards_without_grad(model, dense, tp, vocab=30, lengths=(1, 6, 11, 12)):
    """``model`` and ``dense`` on ids of each length, without gradients: the largest logit difference and
    whether the forward ran sequence parallel (reduce-scatters) or on the whole sequence (none)."""
    out = {}
    with torch.no_grad():
        for T in lengths:
            ids = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(T))
            logits, counts = _counted_forward(model, ids)
            err = float((gather_logits(logits) - dense(ids)).abs().max())
            sharded = bool(counts.keys() & {"reduce_scatter_tensor", "reduce_scatter_single"})
            out[T] = (err, "sequence" if sharded else "whole")
    return out


def _assert_any_length_without_grad(forwards, tp):
    """A length that divides by TP runs sequence parallel, any other on the whole sequence; both exact."""
    for T, (err, how) in forwards.items():
        assert err < 1e-12 and how == ("whole" if T % tp else "sequence"), (T, err, how)


def _check_sp_parity(name, tp, sharded_loss):
    m = _dist.mesh(tp)
    dense, model = models.build(name), models.build(name)
    head = "lm_head"  # sharded logits (the default) or gathered by the head
    policy = {
        **{p: s for p, s in _auto_patterns(model).items()},
        head: {"style": "vocab", "gather_output": not sharded_loss},
    }
    plan = apply_policy(model, m.tp_group, policy, sequence_parallel=True)  # verify=True: the self-check passes
    assert plan.sequence_parallel
    assert any(isinstance(x, SequenceShardedEmbedding) for x in model.modules())  # the position table
    vocab, T = 30, 12
    g = torch.Generator().manual_seed(7 + m.dp_rank)
    ids = torch.randint(0, vocab, (3, T), generator=g)
    tgt = torch.randint(0, vocab, (3, T), generator=g)
    tgt[1, :4] = -100
    ld_logits = dense(ids)
    lt_logits, counts = _counted_forward(model, ids)
    # activations between the parallel layers are sequence-sharded: no all-reduce in forward
    assert "all_reduce" not in counts and counts.keys() & {"reduce_scatter_tensor", "reduce_scatter_single"}, counts
    if not sharded_loss:
        torch.testing.assert_close(lt_logits, ld_logits, **TOL)
    models.loss_parity_backward(ld_logits, lt_logits, tgt, vocab, TOL)
    partial = [n for n, p in model.named_parameters() if has_partial_grad(p)]
    _assert_grads_match_dense(model, dense, m)
    _assert_any_length_without_grad(_forwards_without_grad(model, dense, tp), tp)
    return partial


def _auto_patterns(model):
    plan = plan_policy(model, 2, "auto")
    return {row.name: {"style": row.style, **row.options} for row in plan.modules}


@pytest.mark.parametrize(("world", "tp"), [(2, 2), (4, 4)], ids=["tp2", "tp4"])
@pytest.mark.parametrize("name", ["plain", "plain_gqa", "plain_mqa", "plain_tied", "nano"])
def test_sequence_parallel_parity(world, tp, name):
    for partial in _dist.run(world, _check_sp_parity, name, tp, False):
        assert any("norm" in n or "ln" in n for n in partial), partial  # the norms' grads are summed over TP


def test_sequence_parallel_parity_sharded_loss_tp2_dp2():
    for partial in _dist.run(4, _check_sp_parity, "nano", 2, True):
        assert partial


def _check_sequence_not_divisible():
    m = _dist.mesh(2)
    model = models.build("nano")
    apply_policy(model, m.tp_group, "auto", sequence_parallel=True)
    counts, restore = _counting_collectives()
    try:
        with pytest.raises(ShardingError, match="'transformer.wte'.*length 11 does not divide by 2.*multiple of 2"):
            model(torch.randint(0, 30, (2, 11)))
    finally:
        restore()
    assert counts == {}, counts  # raised before any collective
    return True


def test_sequence_length_not_divisible_is_a_sharding_error_with_gradients():
    """Training at a length that does not divide by TP is refused (the parameters whose gradients
    sequence parallelism sums over TP would be counted once per rank); without gradients such a
    length runs on the whole sequence (the parity tests check it)."""
    assert all(_dist.run(2, _check_sequence_not_divisible))


def test_sequence_parallel_needs_an_lm_head_and_parallel_row_inputs():
    model = models.build("plain")
    with pytest.raises(PolicyError, match="needs the model's output to leave through a vocab-parallel LM head"):
        plan_policy(model, 2, {"layers.*.attn.q_proj": "column", "layers.*.attn.o_proj": "row"}, sequence_parallel=True)
    with pytest.raises(
        PolicyError, match=r"\(style .row.\): with input_is_parallel=False it cannot be sequence parallel"
    ):
        plan_policy(
            model, 2, {**_auto_patterns(model), "layers.0.mlp.down_proj": {"style": "row", "input_is_parallel": False}},
            sequence_parallel=True,
        )  # fmt: skip


def _check_layer_stack_region(tp, alibi):
    """Float64 parity of a model whose layers take per-position inputs, under sequence parallelism."""
    from lightning_tp.engine.layers import VocabParallelEmbedding

    m = _dist.mesh(tp)
    torch.manual_seed(0)
    dense = models.RopeGPT(alibi=alibi).double()
    model = models.RopeGPT(alibi=alibi).double()
    model.load_state_dict(dense.state_dict())
    plan = apply_policy(model, m.tp_group, "auto", sequence_parallel=True)  # verify=True passes
    styles = {r.name: (r.style, r.options) for r in plan.modules}
    g = torch.Generator().manual_seed(3)
    ids, tgt = torch.randint(0, 30, (2, 12), generator=g), torch.randint(0, 30, (2, 12), generator=g)
    ld = dense(ids)
    lt, counts = _counted_forward(model, ids)
    models.loss_parity_backward(ld, lt, tgt, 30, TOL)
    partial = sorted(n for n, p in model.named_parameters() if has_partial_grad(p))
    _assert_grads_match_dense(model, dense, m)
    _assert_any_length_without_grad(_forwards_without_grad(model, dense, tp), tp)
    embedding = model.embed
    return {
        "styles": styles,
        "partial": partial,
        "embedding_split": isinstance(embedding, VocabParallelEmbedding) and embedding.sequence_parallel,
        "counts": counts,
    }


@pytest.mark.parametrize("alibi", [False, True], ids=["rotary", "alibi"])
@pytest.mark.parametrize("tp", [2, 4])
def test_layers_that_take_per_position_inputs_make_the_layer_stack_the_sequence_parallel_region(tp, alibi):
    """A model that builds its layers' per-position inputs (rotary tables) from the embeddings' output
    would build them for T/p positions from Megatron's split at the embeddings. Its layer stack is the
    sequence-sharded region instead: the first layer splits the sequence at its input, the last gathers
    it at its output; the embedding (all-reduce, not reduce-scatter), its dropout, the final norm and the
    head run as without sequence parallelism, the layers' norms have partial gradients. Logits and every
    gradient equal the dense model's (float64). ALiBi biases of all heads, built outside the stack for
    the whole sequence the attention gathers, are cut to each rank's heads."""
    for r in _dist.run(tp, _check_layer_stack_region, tp, alibi):
        styles = r["styles"]
        stack = {"in_features": [32], "split_input": True, "gather_output": False, "arg": 0, "ndim": 3}
        assert styles["blocks.0"] == ("sequence_stack", stack)  # the hidden states: its first argument, 3-D
        assert styles["blocks.2"][1]["gather_output"] and not styles["blocks.2"][1]["split_input"]
        assert styles["blocks.1.mlp"][0] == "sequence_gather" and styles["blocks.1.resid_drop"][0] == "tp_dropout"
        # (its forward takes `alibi`, so the cut is planned for both models; a None passes)
        assert styles["blocks.1.attn"] == ("sequence_gather", {"in_features": [32], "inputs": {"alibi": 4}})
        assert "drop" not in styles and "norm" not in styles  # as without sequence parallelism
        assert not r["embedding_split"] and r["counts"].get("all_reduce") == 1  # the embedding's (+ nothing else)
        assert r["partial"] == sorted(f"blocks.{i}.norm{j}.weight" for i in range(3) for j in (1, 2)), r["partial"]


def _embedding_dropout_masks(tp, T=12):
    """Whether each dropout's output (and the final norm's input) is the same on every TP rank, in training
    mode; at a length that does not divide by TP without gradients (generation in training mode)."""
    import torch.distributed as dist

    m = _dist.mesh(tp)
    torch.manual_seed(0)  # the same weights and default stream on every rank, as Lightning seeds them
    model = models.RopeGPT(dropout=0.5)
    apply_policy(model, m.tp_group, "auto", sequence_parallel=True, rng_tracker=_tracker(m))
    seen = {}
    model.drop.register_forward_hook(lambda mod, args, out: seen.setdefault("drop", out.detach()))
    model.blocks[0].resid_drop.register_forward_hook(lambda mod, args, out: seen.setdefault("resid", out.detach()))
    model.norm.register_forward_hook(lambda mod, args, out: seen.setdefault("final", args[0].detach()))
    model.train()
    with torch.set_grad_enabled(T % tp == 0):
        model(torch.randint(0, 30, (2, T), generator=torch.Generator().manual_seed(0)))
    out = {}
    for key, t in seen.items():
        gathered = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(gathered, t.contiguous(), group=m.tp_group)
        out[key] = all(torch.equal(gathered[0], x) for x in gathered[1:])
    return out


def _generations(tp):
    """Tokens generated under sequence parallelism and by the dense model: the project's CausalLM (its own
    generate samples from contexts of every length up to block_size) and, with transformers installed,
    Hugging Face's greedy generate with its KV cache (a prompt of 4 tokens runs sequence parallel, one of 5
    and every cached decode step of one token on the whole sequence), with the scores of each step."""
    from lightning_tp.models import CausalLM

    m = _dist.mesh(tp)
    torch.manual_seed(0)
    lm = CausalLM(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32).double()
    dense = copy.deepcopy(lm).eval()
    apply_policy(lm.model, m.tp_group, "auto", sequence_parallel=True)
    prompt = torch.tensor([[3, 7, 1]])
    out = {"causal_lm": torch.equal(lm.eval().generate(prompt, 16), dense.generate(prompt, 16))}
    if not HAS_HF:
        return out
    for name in ("hf_llama", "hf_gpt2", "hf_llama-checkpointing"):
        dense, model = models.build(name.split("-")[0]), models.build(name.split("-")[0])
        apply_policy(model, m.tp_group, "auto", sequence_parallel=True)
        if name.endswith("checkpointing"):  # its embeddings' output requires grad, even under no_grad
            model.gradient_checkpointing_enable()
            model.eval()
        for T in (4, 5):
            ids = torch.randint(2, 30, (2, T), generator=torch.Generator().manual_seed(T))
            kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "output_scores": True}
            kw["return_dict_in_generate"] = True
            got, ref = model.generate(ids, **kw), dense.generate(ids, **kw)
            err = max(float((gather_logits(a) - b).abs().max()) for a, b in zip(got.scores, ref.scores, strict=True))
            out[f"{name}-{T}"] = (torch.equal(got.sequences, ref.sequences), err)
    return out


@pytest.mark.parametrize("tp", [2])
def test_generation_under_sequence_parallelism_matches_dense(tp):
    """Generation runs without gradients, at the lengths its prompt and its steps give: each forward whose
    length does not divide by TP (a decode step of one token) runs on the whole sequence, as without
    sequence parallelism, on the same weights; the tokens are the dense model's."""
    for r in _dist.run(tp, _generations, tp):
        assert r.pop("causal_lm"), r
        for key, (same, err) in r.items():
            assert same and err < 1e-10, (key, same, err)


class _RopeStates(models.RopeGPT):
    """RopeGPT that also returns the hidden states entering each layer and the last one's output, and the
    last token's final state (a reward head's input: as long as a chunk at 2 tokens, TP 2, yet whole)."""

    def forward(self, ids):
        x = self.drop(self.embed(ids))
        pos = torch.arange(x.size(1), dtype=x.dtype)
        inv = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2, dtype=x.dtype) / self.head_dim)
        angles = torch.cat([torch.outer(pos, inv)] * 2, -1)
        states = []
        for block in self.blocks:
            states.append(x)
            x = block(x, angles.cos(), angles.sin())
        return self.lm_head(self.norm(x)), [*states, x], x[:, -1:]


def _returned_hidden_states(tp):
    """Hidden states returned from inside the sequence-sharded layer stack, against the dense model's:
    their shapes and largest difference; the gradients of a loss that reads an intermediate one."""
    from lightning_tp.lightning.precision import all_reduce_partial_grads

    m = _dist.mesh(tp)
    cases = {"rope": lambda: _RopeStates().double()}
    if HAS_HF:
        cases |= {"hf_llama": lambda: models.build("hf_llama"), "hf_gpt2": lambda: models.build("hf_gpt2")}
    out = {}
    for name, build in cases.items():
        torch.manual_seed(0)
        dense = build()
        model = copy.deepcopy(dense)
        apply_policy(model, m.tp_group, "auto", sequence_parallel=True)

        def run(net, ids, name=name):
            if name == "rope":
                return net(ids)[:2]
            res = net(ids, output_hidden_states=True)
            return res.logits, res.hidden_states

        ids = torch.randint(2, 30, (2, 8), generator=torch.Generator().manual_seed(0))
        (lt, ht), (ld, hd) = run(model, ids), run(dense, ids)
        err = max(float((a - b).abs().max()) for a, b in zip(ht, hd, strict=True))
        (ht[1].pow(2).mean() + gather_logits(lt).mean()).backward()
        (hd[1].pow(2).mean() + ld.mean()).backward()
        all_reduce_partial_grads(list(model.parameters()), m.tp_group)
        grad = 0.0
        for pname, param in model.named_parameters():
            ref = dense.get_parameter(pname).grad
            if type(dense.get_submodule(pname.rpartition(".")[0])).__name__ == "Conv1D" and ref.dim() == 2:
                ref = ref.t()  # GPT-2's Conv1D stores (in, out); the rewritten layer (out, in)
            spec = shard_spec(param)
            grad = max(grad, float((param.grad - (ref if spec is None else spec.shard(ref, m.tp_rank))).abs().max()))
        out[name] = {"shapes": {tuple(h.shape) for h in ht}, "err": err, "grad_err": grad}
        if name == "rope":  # a tensor made from a chunk-long slice of the whole states is not a chunk
            two = torch.randint(2, 30, (2, 2), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                (_, st, pt), (_, sd, pd) = model(two), dense(two)
            out["pooled"] = (
                tuple(pt.shape),
                float((pt - pd).abs().max()),
                max(float((a - b).abs().max()) for a, b in zip(st, sd, strict=True)),
            )
    return out


def test_hidden_states_returned_from_inside_the_layer_stack_are_whole():
    """Where the layer stack is the sequence-sharded region, the hidden states a model returns from inside
    it (Hugging Face's output_hidden_states=True; a user's list of each layer's input) are all-gathered
    where the module that calls the stack returns them: the dense model's tensors, and a loss that reads
    an intermediate one gives the dense model's gradients."""
    for r in _dist.run(2, _returned_hidden_states, 2):
        shape, pooled_err, states_err = r.pop("pooled")
        assert shape == (2, 1, 32) and pooled_err < 1e-12 and states_err < 1e-12, (shape, pooled_err, states_err)
        for name, res in r.items():
            width = 32 if name != "hf_llama" else 64
            assert res["shapes"] == {(2, 8, width)} and res["err"] < 1e-12 and res["grad_err"] < 1e-12, (name, res)


class _CrossAttention(torch.nn.Module):
    def __init__(self, d, n_heads, causal):
        super().__init__()
        self.n_heads, self.causal = n_heads, causal
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, x, mem=None):
        mem = x if mem is None else mem
        (B, T, _), S = x.shape, mem.shape[1]
        q = self.q_proj(x).view(B, T, self.n_heads, -1).transpose(1, 2)
        k, v = (f(mem).view(B, S, self.n_heads, -1).transpose(1, 2) for f in (self.k_proj, self.v_proj))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class _DecoderBlock(torch.nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = (torch.nn.LayerNorm(d) for _ in range(3))
        self.attn, self.cross, self.mlp = _CrossAttention(d, n_heads, True), _CrossAttention(d, n_heads, False), _MLP(d)

    def forward(self, x, mem):
        x = x + self.attn(self.ln1(x))
        x = x + self.cross(self.ln2(x), self.ln2(mem))
        return x + self.mlp(self.ln3(x))


class _EncoderDecoder(torch.nn.Module):
    """nanoGPT-style encoder and decoder sharing their embeddings (Megatron's split: two sequences enter
    the sequence-sharded region in one forward), the decoder cross-attending to the encoder's output."""

    def __init__(self, vocab=30, d=16, n_heads=4):
        super().__init__()
        self.wte, self.wpe = torch.nn.Embedding(vocab, d), torch.nn.Embedding(32, d)
        self.enc = torch.nn.ModuleList(_DecoderBlock(d, n_heads) for _ in range(2))
        self.dec = torch.nn.ModuleList(_DecoderBlock(d, n_heads) for _ in range(2))
        self.ln_f, self.lm_head = torch.nn.LayerNorm(d), torch.nn.Linear(d, vocab, bias=False)

    def forward(self, src, tgt):
        e = self.wte(src) + self.wpe(torch.arange(src.shape[1]))
        for block in self.enc:
            e = block(e, e)
        x = self.wte(tgt) + self.wpe(torch.arange(tgt.shape[1]))
        for block in self.dec:
            x = block(x, e)
        return self.lm_head(self.ln_f(x))


def _encoder_decoder(cls, tp):
    """``cls``'s dense model and a sequence-parallel copy at ``tp`` (verify=True passes), and a generator."""
    m = _dist.mesh(tp)
    torch.manual_seed(0)
    dense = cls().double()
    model = copy.deepcopy(dense)
    g = torch.Generator().manual_seed(0)
    example = (torch.randint(0, 30, (2, 12), generator=g), torch.randint(0, 30, (2, 8), generator=g))
    apply_policy(model, m.tp_group, "auto", sequence_parallel=True, example_input=example)
    return m, dense, model, g


def _pair_errors(model, dense, g, pairs):
    """Largest logit difference without gradients, per (encoder, decoder) length pair."""
    out = {}
    for S, T in pairs:
        src, tgt = torch.randint(0, 30, (2, S), generator=g), torch.randint(0, 30, (2, T), generator=g)
        with torch.no_grad():
            out[(S, T)] = float((gather_logits(model(src, tgt)) - dense(src, tgt)).abs().max())
    return out


def _two_sequences(tp):
    """Without gradients, an encoder's and a decoder's sequence each run whole or sequence-sharded by their
    own length, told apart inside by length; a length that would be both is refused."""
    m, dense, model, g = _encoder_decoder(_EncoderDecoder, tp)
    out = _pair_errors(model, dense, g, ((12, 8), (12, 5), (11, 8), (11, 5), (12, 1)))
    with torch.no_grad(), pytest.raises(ShardingError, match="a sequence of 5 tokens.*chunks of 5 tokens"):
        model(torch.randint(0, 30, (2, 10)), torch.randint(0, 30, (2, 5)))
    compiled = torch.compile(model, backend="eager")  # traced: one decision per forward, the sequences must agree
    out |= {("compiled", *k): v for k, v in _pair_errors(compiled, dense, g, ((11, 5),)).items()}
    with (
        torch.no_grad(),
        pytest.raises(ShardingError, match="compiled.*'wte' a sequence of 5 tokens, which runs whole"),
    ):
        compiled(torch.randint(0, 30, (2, 12)), torch.randint(0, 30, (2, 5)))
    from lightning_tp.engine.compiled import compile_layers

    blocks = copy.deepcopy(dense)  # compiled block by block: the traced blocks leave a mixed forward to eager
    apply_policy(blocks, m.tp_group, "auto", sequence_parallel=True, verify=False)
    compile_layers(blocks, backend="eager")
    return out | {("blocks", *k): v for k, v in _pair_errors(blocks, dense, g, ((12, 5),)).items()}


class _Encoder(torch.nn.Module):
    def __init__(self, vocab=30, d=16, n_heads=4):
        super().__init__()
        self.wte, self.wpe = torch.nn.Embedding(vocab, d), torch.nn.Embedding(32, d)
        self.blocks = torch.nn.ModuleList(_DecoderBlock(d, n_heads) for _ in range(2))

    def forward(self, ids, mem=None):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x, x if mem is None else mem)
        return x


class _NestedEncoderDecoder(torch.nn.Module):
    """An encoder and a decoder as submodules, each with embeddings of its own (each holds entries)."""

    def __init__(self, vocab=30, d=16):
        super().__init__()
        self.encoder, self.decoder = _Encoder(vocab, d), _Encoder(vocab, d)
        self.ln_f, self.lm_head = torch.nn.LayerNorm(d), torch.nn.Linear(d, vocab, bias=False)

    def forward(self, src, tgt):
        return self.lm_head(self.ln_f(self.decoder(tgt, self.encoder(src))))


def _nested_two_sequences(tp):
    _, dense, model, g = _encoder_decoder(_NestedEncoderDecoder, tp)
    return _pair_errors(model, dense, g, ((12, 8), (12, 5), (11, 8), (11, 5)))


def test_two_sequences_of_one_forward_run_whole_or_sharded_by_their_own_length():
    """Also where the encoder and the decoder hold their entries themselves: the decoder's forward keeps
    the encoder's record (only the outermost module holding entries starts a forward afresh)."""
    for r in _dist.run(2, _two_sequences, 2) + _dist.run(2, _nested_two_sequences, 2):
        assert all(err < 1e-12 for err in r.values()), r


def _tracker(m):
    from lightning_tp import model_parallel_seed

    return model_parallel_seed(0, m.tp_rank, m.dp_rank)


def test_dropout_before_the_layer_stack_draws_one_mask_on_every_tensor_parallel_rank():
    """Where the layer stack is the sequence-sharded region, a dropout before it acts on the whole,
    replicated sequence: every TP rank draws the same mask (it would otherwise enter the first layer
    different on each rank); a dropout inside the stack acts on this rank's chunk and draws its own."""
    for r in _dist.run(2, _embedding_dropout_masks, 2):
        assert r == {"drop": True, "resid": False, "final": True}, r


def test_dropouts_of_a_forward_on_the_whole_sequence_draw_one_mask_on_every_tensor_parallel_rank():
    """Without gradients at a length that does not divide by TP (Hugging Face's generate on a model left
    in training mode) the stack runs on the whole, replicated sequence: the dropouts planned per rank for
    the sequence-sharded activations then drop alike on every rank, or the ranks' hidden states would part."""
    for r in _dist.run(2, _embedding_dropout_masks, 2, 11):
        assert r == {"drop": True, "resid": True, "final": True}, r


class _NestedLayers(torch.nn.Module):
    """x-transformers' layout: ``layers`` holds a ``ModuleList([attention, feed-forward])`` per layer, and
    the forward unpacks them (``for attn, ff in self.layers``): no element of ``layers`` is ever called."""

    def __init__(self, d=16, vocab=30):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleList([models.PlainAttention(d, 4), models.SwiGLU(d, 2 * d)]) for _ in range(2)
        )
        self.norms = torch.nn.ModuleList(torch.nn.RMSNorm(d) for _ in range(4))
        self.norm, self.lm_head = torch.nn.RMSNorm(d), torch.nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.embed_tokens(idx)
        for i, (attn, ff) in enumerate(self.layers):
            x = x + attn(self.norms[2 * i](x))
            x = x + ff(self.norms[2 * i + 1](x))
        return self.lm_head(self.norm(x))


def _check_nested_layers():
    m = _dist.mesh(2)
    torch.manual_seed(0)
    dense = _NestedLayers().double()
    model = _NestedLayers().double()
    model.load_state_dict(dense.state_dict())
    plan = apply_policy(model, m.tp_group, "auto", sequence_parallel=True)  # verify=True passes
    ids = torch.randint(0, 30, (2, 8), generator=torch.Generator().manual_seed(0))
    models.loss_parity_backward(dense(ids), model(ids), ids, 30, TOL)
    _assert_grads_match_dense(model, dense, m)
    return [r.name for r in plan.modules if r.style == "sequence_stack"]


def test_layers_the_forward_never_calls_keep_the_split_at_the_embeddings():
    """The trace reaches no element of the layer list (the forward unpacks each into its attention and
    feed-forward): Megatron's split at the embeddings, as before, exact against the dense model."""
    assert _dist.run(2, _check_nested_layers) == [[], []]


def _check_hidden_width_inputs_that_are_not_the_hidden_states():
    """A float mask as wide as the hidden states (sequence length = hidden width, eager attention) and an
    encoder's states for cross-attention pass each layer whole; only the hidden states are split."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_tp import gather_logits

    m = _dist.mesh(2)
    out = {}
    torch.manual_seed(0)
    llama = models.hf_llama().double()  # hidden 64, eager attention: its causal mask is a float (B, 1, T, T)
    model = models.HFLogits(llama)
    dense = copy.deepcopy(model)
    apply_policy(model, m.tp_group, "auto", sequence_parallel=True)  # checked at T = 8
    ids = torch.randint(0, 30, (1, 64), generator=torch.Generator().manual_seed(1))  # T = 64 = the hidden width
    out["mask"] = float((gather_logits(model(ids)) - dense(ids)).abs().max())
    cfg = GPT2Config(vocab_size=30, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, attn_implementation="eager", add_cross_attention=True)  # fmt: skip
    torch.manual_seed(0)
    dense = GPT2LMHeadModel(cfg).double()
    model = copy.deepcopy(dense)
    apply_policy(model, m.tp_group, "auto", sequence_parallel=True)
    enc = torch.randn(2, 6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ids = torch.randint(0, 30, (2, 8), generator=torch.Generator().manual_seed(3))
    got = gather_logits(model(input_ids=ids, encoder_hidden_states=enc).logits)
    out["cross"] = float((got - dense(input_ids=ids, encoder_hidden_states=enc).logits).abs().max())
    return out


@pytest.mark.skipif(not HAS_HF, reason="transformers (extra 'hf') not installed")
def test_only_the_hidden_states_are_split_at_the_layer_stack():
    """Which argument carries the hidden states is read from the trace and only it is split (and only
    tensors of its rank gathered in the stack): Llama at a sequence length equal to its hidden width
    (its eager float mask is (B, 1, 64, 64)), GPT-2 with cross-attention to 6 encoder states."""
    for r in _dist.run(2, _check_hidden_width_inputs_that_are_not_the_hidden_states):
        assert r["mask"] < 1e-10 and r["cross"] < 1e-10, r


@pytest.mark.skipif(not HAS_HF, reason="transformers (extra 'hf') not installed")
def test_every_caller_traces_the_same_forward():
    """A LightningModule without a forward (its training_step calls self.model): the plan before launch,
    setup's and ``lightning-tp plan`` all trace the wrapped model (forward_target), so they plan alike;
    a forward that fails on the example is said (PolicyWarning), and the sequence split at the
    embeddings."""
    import lightning as L

    from lightning_tp.lightning.strategy import forward_target
    from lightning_tp.policy import PolicyWarning

    class NoForward(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = models.HFLogits(models.build("hf_llama"))

    lm = NoForward()
    forward, example = forward_target(lm)
    assert forward is lm.model and example is None
    plan = plan_policy(lm, 2, "auto", sequence_parallel=True, forward_module=forward)
    assert [r.name for r in plan.modules if r.style == "sequence_stack"] == [
        "model.model.model.layers.0",
        "model.model.model.layers.1",
    ]
    with pytest.warns(PolicyWarning, match=r"forward of the model up to its first layer .*failed"):
        plan = plan_policy(lm, 2, "auto", sequence_parallel=True)  # LightningModule.forward: not implemented
    assert not any(r.style == "sequence_stack" for r in plan.modules)


def test_a_policy_that_splits_no_layer_is_refused_under_sequence_parallelism():
    """Only the embedding and the head split (a Hugging Face plan that covers no more, or a model without
    attention): every layer would run whole on 1/TP of the sequence. Refused before any change, naming
    the policy; a Hugging Face plan is told of policy='names' (before: the self-check blamed the head,
    and with verify=False the logits were wrong). Only the experts split: planned, with a warning."""
    with pytest.raises(PolicyError, match=r"splits no layer of the model .*sequence_parallel=False\.$"):
        plan_policy(models.build("plain"), 2, {"embed_tokens": "vocab", "lm_head": "vocab", "*": "replicate"},
                    sequence_parallel=True)  # fmt: skip
    if HAS_HF:
        import hf_zoo

        with pytest.raises(PolicyError, match=r"policy \(huggingface tp_plan\) splits no layer.*policy='names'"):
            plan_policy(hf_zoo.build("gpt_oss"), 2, "auto", sequence_parallel=True)
        # experts alone (Hugging Face's HunYuan-MoE, PhiMoE and GraniteMoE plans split nothing else): they
        # gather their tokens, and the attention left whole runs on the whole sequence, replicated (the layer
        # stack is the region), which a warning says (before this: refused; before that, verify's output check
        # caught it, and with verify=False the model trained on per-chunk attention)
        mixtral = hf_zoo.build("mixtral")
        experts = translate_hf_plan({k: v for k, v in hf_plan(mixtral).items() if ".experts" in k})
        policy = {"lm_head": "vocab", "model.embed_tokens": "vocab"}
        policy.update({p: {"style": r.style, **r.options} for p, r in experts.items()})
        with pytest.warns(PolicyWarning, match=r"splits only the experts \(\['model.layers.0.mlp.experts'.*attention"):
            plan = plan_policy(mixtral, 2, policy, sequence_parallel=True)
        assert {m.name: m.style for m in plan.modules}["model.layers.0.self_attn"] == "sequence_whole"
        plan_policy(mixtral, 2, policy)  # without sequence parallelism the plan stands
        # the user's own entry keeping them whole stands (a position-wise layer may be named query/key/value)
        plan_policy(mixtral, 2, {"*.self_attn.*": "replicate", **policy}, sequence_parallel=True)


class _PositionsFromEmbeddings(torch.nn.Module):
    """Positions numbered from the embeddings' output, and layers that take the hidden states alone:
    nothing in the layers' inputs shows that the embeddings' output must stay whole."""

    def __init__(self):
        super().__init__()
        self.inner = models.PlainGPT(vocab=30, d=16, n_layers=2, n_heads=4, ctx=32)

    def forward(self, idx):
        t = self.inner
        x = t.embed_tokens(idx)
        x = x + t.pos(torch.arange(x.shape[1]))
        for layer in t.layers:
            x = layer(x)
        return t.lm_head(t.norm(x))


def _check_positions_from_embeddings_refused():
    m = _dist.mesh(2)
    model = _PositionsFromEmbeddings().double()
    with pytest.raises(PolicyMismatchError, match=r"1/2 of the sequence.*check the model with sequence_parallel=False"):
        apply_policy(model, m.tp_group, "auto", sequence_parallel=True)
    return True


def test_model_that_reads_sequence_length_from_activations_is_caught_by_verify():
    # the layers take the hidden states alone: Megatron's split at the embeddings, and the position table
    # gets T/p positions: the self-check refuses it, and its message names sequence parallelism as the
    # cause to check first
    assert all(_dist.run(2, _check_positions_from_embeddings_refused))


@pytest.mark.skipif(not HAS_HF, reason="transformers (extra 'hf') not installed")
def test_where_the_sequence_is_split_is_read_from_the_layers_inputs():
    """Layers that take the hidden states alone: Megatron's split at the embeddings (no sequence_stack
    row). Hugging Face layers take positions and masks: the stack is the region, read from a forward up
    to the first layer, on meta tensors for a model built on the meta device."""
    stack = lambda plan: [
        (r.name, r.options["split_input"], r.options["gather_output"])
        for r in plan.modules
        if r.style == "sequence_stack"
    ]  # noqa: E731
    assert stack(plan_policy(models.build("plain"), 2, "auto", sequence_parallel=True)) == []
    expected = [("model.model.layers.0", True, False), ("model.model.layers.1", False, True)]
    assert stack(plan_policy(models.HFLogits(models.build("hf_llama")), 2, "auto", sequence_parallel=True)) == expected
    with torch.device("meta"):
        meta = models.HFLogits(models.hf_llama())
    assert stack(plan_policy(meta, 2, "auto", sequence_parallel=True)) == expected


def _saved_activation_shapes(name, sp):
    """Shapes of the tensors autograd keeps for backward in one forward of the rewritten model."""
    m = _dist.mesh(2)
    model = models.build(name)
    apply_policy(model, m.tp_group, "auto", sequence_parallel=sp, verify=False)
    params = {p.data_ptr() for p in model.parameters()}
    shapes = []

    def pack(t):
        if t.data_ptr() not in params and t.is_floating_point():
            shapes.append(tuple(t.shape))
        return t

    ids = torch.randint(0, 30, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids).sum().backward()
    return shapes


@pytest.mark.parametrize("name", ["plain", "nano"])
def test_sequence_parallel_keeps_no_full_sequence_hidden_state_for_backward(name):
    """Megatron's activation saving: column layers and the LM head keep the sequence shard of their
    input and gather it again in backward, so no full-sequence hidden state (B*T*H elements, H wide,
    in any view) is kept for backward; without SP there are several."""
    hidden, full, shard = 16, 3 * 12 * 16, 3 * 6 * 16  # models.build: d_model 16; batch 3, T 12, TP 2

    def hidden_states(shapes, numel):
        return [s for s in shapes if s[-1] == hidden and math.prod(s) == numel]

    for dense_shapes, sp_shapes in zip(
        _dist.run(2, _saved_activation_shapes, name, False),
        _dist.run(2, _saved_activation_shapes, name, True),
        strict=True,
    ):
        assert hidden_states(dense_shapes, full)
        assert not hidden_states(sp_shapes, full), sp_shapes
        assert hidden_states(sp_shapes, shard)


class _FlatMLP(models.SwiGLU):
    """An MLP that views its input with its tokens flattened (as Hugging Face's mixtures of experts do,
    ``hidden_states.view(-1, hidden_dim)``, before routing): ``view`` needs the input contiguous."""

    def forward(self, x):
        tokens = x.view(-1, x.shape[-1])
        return super().forward(tokens.view(x.shape))


class _FlatCaller(torch.nn.Module):
    """Calls its MLP on the tokens flattened with the batch, ``(B*T, d)``, as Hugging Face's mixtures of
    experts call their shared experts (ERNIE-4.5-MoE, HunYuan): the block that gathers gets 2-D input."""

    def __init__(self, mlp):
        super().__init__()
        self.shared = mlp

    def forward(self, x):
        return self.shared(x.view(-1, x.shape[-1])).view(x.shape)


def _check_flattening_block(caller):
    m = _dist.mesh(2)
    torch.manual_seed(0)
    dense = models.RopeGPT().double()  # layers that take the rotary tables: each block gathers its input
    for block in dense.blocks:
        flat = _FlatMLP(32, 64).double()
        flat.load_state_dict(block.mlp.state_dict())
        block.mlp = _FlatCaller(flat) if caller else flat
    model = copy.deepcopy(dense)
    apply_policy(model, m.tp_group, "auto", sequence_parallel=True)  # verify=True: the same outputs and grads
    ids = torch.randint(0, 30, (3, 12), generator=torch.Generator().manual_seed(1))
    logits = gather_logits(model(ids))
    torch.testing.assert_close(logits, dense(ids), **TOL)
    logits.square().mean().backward()
    dense(ids).square().mean().backward()
    _assert_grads_match_dense(model, dense, m)
    _assert_any_length_without_grad(_forwards_without_grad(model, dense, 2), 2)
    return True


@pytest.mark.parametrize("caller", [False, True], ids=["views_inside", "flattened_by_its_caller"])
def test_a_block_that_views_its_gathered_input_runs_under_sequence_parallelism(caller):
    """The sequence gathered at a block's input (batch-first, gathered on dim 1) is contiguous, as the dense
    model's activations are: a block that ``view``s it runs (before: "view size is not compatible with
    input tensor's size and stride", so Hugging Face's HunYuan-MoE, Jamba and AFMoE were refused). A block
    called on the tokens flattened with the batch, ``(B*T/p, d)``, gathers them too where the layer stack
    is the region (whose gathers take only tensors of the hidden states' rank, and one fewer for these;
    before, ERNIE-4.5-MoE's, HunYuan-V3's and Laguna's shared experts ran on this rank's tokens alone)."""
    assert all(_dist.run(2, _check_flattening_block, caller))


class _Scaled(torch.nn.Module):
    """A model with whole parameters that are not norms: a logit scale on the gathered logits
    (complete grad on every rank) and, optionally, a layer-scale vector on the sharded residual."""

    def __init__(self, layer_scale):
        super().__init__()
        self.inner = models.build("nano")
        self.logit_scale = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
        self.gamma = torch.nn.Parameter(torch.full((16,), 0.9, dtype=torch.float64)) if layer_scale else None
        if layer_scale:
            self.inner.transformer.h[0].register_forward_hook(lambda _, __, out: out * self.gamma)

    def forward(self, idx):
        return self.inner(idx) * self.logit_scale


def _check_whole_params(layer_scale):
    from lightning_tp.errors import SequenceParallelGradError
    from lightning_tp.lightning.precision import check_partial_grad_marks

    m = _dist.mesh(2)
    torch.manual_seed(0)
    dense, model = _Scaled(layer_scale), _Scaled(layer_scale)
    model.load_state_dict(dense.state_dict())
    if layer_scale:  # verify's backward already finds the unmarked partial gradient, before training
        with pytest.raises(PolicyMismatchError, match=r"'gamma'.*Summed over the TP ranks it is right"):
            apply_policy(model, m.tp_group, "auto", sequence_parallel=True)
        model = _Scaled(layer_scale)
        model.load_state_dict(dense.state_dict())
    apply_policy(model, m.tp_group, "auto", sequence_parallel=True, verify=not layer_scale)
    ids = torch.randint(0, 30, (2, 12), generator=torch.Generator().manual_seed(1))
    dense(ids).square().mean().backward()
    model(ids).square().mean().backward()
    named = list(model.named_parameters())
    if layer_scale:
        with pytest.raises(SequenceParallelGradError, match=r"\['gamma'\] differ across the tensor-parallel ranks"):
            check_partial_grad_marks(named, m.tp_group, sequence_parallel=True)
        return True
    check_partial_grad_marks(named, m.tp_group, sequence_parallel=True)  # the marks fit: no error
    all_reduce_partial_grads([p for _, p in named], m.tp_group)
    torch.testing.assert_close(model.logit_scale.grad, dense.logit_scale.grad, **TOL)  # not summed over TP
    for name, p in named:
        if shard_spec(p) is None:
            torch.testing.assert_close(p.grad, dense.get_parameter(name).grad, **TOL)
    return True


@pytest.mark.parametrize("layer_scale", [False, True], ids=["logit_scale", "layer_scale"])
def test_whole_parameters_outside_norms_are_summed_only_when_partial(layer_scale):
    assert all(_dist.run(2, _check_whole_params, layer_scale))


class _Gain(torch.nn.Module):
    """An elementwise learned scale whose class name says nothing about norms."""

    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.weight


class _PreNormAttention(torch.nn.Module):
    """Attention that holds its own pre-norm: under sequence parallelism the norm runs on the gathered
    (full) sequence, so its gradient is complete, unlike a norm outside the block."""

    def __init__(self, d, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.ln = torch.nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.attn_drop = torch.nn.Dropout(0.0)

    def forward(self, x):
        B, T, _ = x.shape
        h = self.ln(x)
        q, k, v = (p(h).view(B, T, self.n_heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(self.attn_drop(y).transpose(1, 2).reshape(B, T, -1))


class _GainModel(torch.nn.Module):
    def __init__(self, vocab=30, d=16, n_heads=4, ctx=32):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(ctx, d)
        self.attn = torch.nn.ModuleList(_PreNormAttention(d, n_heads) for _ in range(2))
        self.gain = torch.nn.ModuleList(_Gain(d) for _ in range(2))
        self.drop = torch.nn.Dropout(0.0)
        self.head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.drop(self.tok(idx) + self.pos(torch.arange(idx.shape[1])))
        for attn, gain in zip(self.attn, self.gain, strict=True):
            x = gain(x + attn(x))
        return self.head(x)


def _gain_model():
    torch.manual_seed(3)
    return _GainModel().double()


def test_sequence_parallel_pieces_are_plan_rows():
    model = _gain_model()
    plain = {(r.name, r.style) for r in plan_policy(model, 2, "auto").modules}
    plan = plan_policy(model, 2, "auto", sequence_parallel=True)
    rows = {r.name: r for r in plan.modules}
    assert {n for n, r in rows.items() if r.style == "sequence_gather"} == {"attn.0", "attn.1"}
    assert rows["attn.0"].options == {"in_features": [16]}
    assert rows["pos"].style == "sequence_embedding"
    assert rows["drop"].style == "tp_dropout" and rows["attn.1.attn_drop"].style == "tp_dropout"
    partial = {n for n, r in rows.items() if r.options.get("partial_grad")}
    # found by where they run, not by their class name; a norm inside the gathering block too: the
    # block's input reduce-scatter is where its column layers' partial input grads are summed
    assert partial == {"gain.0", "gain.1", "attn.0.ln", "attn.1.ln"}
    # without sequence parallelism: none of these rows (the attention dropout still draws per rank)
    assert not {n for n, s in plain if s in ("sequence_gather", "sequence_embedding")}
    assert not any(n.startswith("gain") for n, _ in plain) and ("attn.0.attn_drop", "tp_dropout") in plain
    text = str(plan)
    assert "sequence_parallel" in text.splitlines()[0] + text.splitlines()[1]
    for name in ("attn.0", "gain.0", "pos", "drop"):
        assert any(line.startswith(f"│ {name} ") for line in text.splitlines()), name


def _check_gain_model():
    from lightning_tp.lightning.precision import check_partial_grad_marks

    m = _dist.mesh(2)
    dense, model = _gain_model(), _gain_model()
    apply_policy(model, m.tp_group, "auto", sequence_parallel=True)  # verify: outputs and every gradient
    ids = torch.randint(0, 30, (2, 12), generator=torch.Generator().manual_seed(1))
    tgt = torch.randint(0, 30, (2, 12), generator=torch.Generator().manual_seed(2))
    models.loss_parity_backward(dense(ids), model(ids), tgt, 30, TOL)
    named = list(model.named_parameters())
    check_partial_grad_marks(named, m.tp_group, sequence_parallel=True)  # the planned marks fit the gradients
    all_reduce_partial_grads([p for _, p in named], m.tp_group)
    for name, p in named:
        ref = dense.get_parameter(name).grad
        spec = shard_spec(p)
        torch.testing.assert_close(p.grad, ref if spec is None else spec.shard(ref, m.tp_rank), **TOL)
    return True


def test_sequence_parallel_marks_follow_where_a_module_runs():
    assert all(_dist.run(2, _check_gain_model))


def _check_gather_cache_with_inner_checkpoint():
    from torch.utils.checkpoint import checkpoint

    m = _dist.mesh(2)
    ids = torch.randint(0, 30, (2, 12), generator=torch.Generator().manual_seed(1))
    grads = []
    for inner_checkpoint in (False, True):
        model = models.build("plain")
        apply_policy(model, m.tp_group, "auto", sequence_parallel=True, verify=False)
        q = model.layers[0].attn.q_proj
        if inner_checkpoint:  # recomputed in backward, after the block's forward has returned
            forward = q.forward
            q.forward = lambda x, forward=forward: checkpoint(forward, x, use_reentrant=False)
        model(ids).gathered().square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        gather = q.sequence_gather
        assert gather is not None and not gather._shards  # nothing kept once the activations are freed
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    return True


def test_sequence_gather_shards_survive_an_inner_recompute_and_are_freed():
    assert all(_dist.run(2, _check_gather_cache_with_inner_checkpoint))


class _MLP(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc, self.fc2 = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc(x)))


class _StackedMLPs(torch.nn.Module):
    """Blocks in an nn.ModuleList, called one after the other on every token."""

    def __init__(self, vocab=30, d=16, n=3):
        super().__init__()
        self.tok, self.head = torch.nn.Embedding(vocab, d), torch.nn.Linear(d, vocab, bias=False)
        self.layers = torch.nn.ModuleList(_MLP(d) for _ in range(n))

    def forward(self, idx):
        x = self.tok(idx)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


class _RoutedMLPs(_StackedMLPs):
    """The same blocks as experts: each token goes to its best-scoring one (a router parameter, not a
    LitGPT/HF-style gate layer)."""

    def __init__(self, vocab=30, d=16, n=3):
        super().__init__(vocab, d, n)
        self.router = torch.nn.Parameter(torch.randn(n, d))

    def forward(self, idx):
        x = self.tok(idx)
        choice = (x @ self.router.t()).argmax(-1)  # (B, T)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.layers):
            mask = choice == i
            out[mask] = expert(x[mask])  # the tokens routed here: (n_i, d)
        return self.head(x + out)


class _TopKGate(torch.nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.wg = torch.nn.Linear(d, n, bias=False)


class _DeepSpeedStyle(_StackedMLPs):
    """DeepSpeed's layout: MOELayer(gate=TopKGate(wg), experts=Experts(deepspeed_experts=ModuleList)),
    the router one level above the container of the experts (only the layout matters here)."""

    def __init__(self, vocab=30, d=16, n=3):
        super().__init__(vocab, d, n)
        experts = torch.nn.Module()
        experts.deepspeed_experts = self.layers
        del self.layers
        self.moe = torch.nn.Module()
        self.moe.gate, self.moe.experts = _TopKGate(d, n), experts


def _with(model, **extra):
    for name, value in extra.items():
        setattr(model, name, value)
    return model


def test_a_mixture_of_experts_runs_on_the_whole_sequence_unless_it_is_the_whole_model():
    plan = plan_policy(_StackedMLPs(), 2, "auto", sequence_parallel=True)
    assert {r.name for r in plan.modules if r.style == "sequence_gather"} == {"layers.0", "layers.1", "layers.2"}
    # a stack whose own (3, 16) tensors are no router: a layer-scale table, a position table; a head over 3 tokens
    lookalikes = _with(_StackedMLPs(), layer_scale=torch.nn.Parameter(torch.ones(3, 16)), pos=torch.nn.Embedding(3, 16))
    plan_policy(lookalikes, 2, "auto", sequence_parallel=True)
    small_vocab = plan_policy(_StackedMLPs(vocab=3), 2, "auto", sequence_parallel=True)
    assert {r.name: r.style for r in small_vocab.modules}["head"] == "vocab"
    plan_policy(_RoutedMLPs(), 2, "auto")  # tensor parallelism alone: each expert split as an MLP
    with pytest.raises(
        PolicyError, match=r"'_RoutedMLPs' routes tokens to 3 experts \(layers\.\*, router 'router'\) and holds"
    ):
        plan_policy(_RoutedMLPs(), 2, "auto", sequence_parallel=True)
    routed = {
        "w_gate (hidden, n)": (_with(_StackedMLPs(), w_gate=torch.nn.Parameter(torch.zeros(16, 3))), "w_gate"),
        "ModuleDict": (_with(_StackedMLPs(), router=torch.nn.Linear(16, 3)), "router"),
    }
    routed["ModuleDict"][0].layers = torch.nn.ModuleDict(
        {f"e{i}": m for i, m in enumerate(routed["ModuleDict"][0].layers)}
    )
    for case, (model, router) in routed.items():  # the mixture of experts is the model itself
        with pytest.raises(PolicyError, match=rf"routes tokens to 3 experts .*router '{router}'\) and holds"):
            plan_policy(model, 2, "auto", sequence_parallel=True)
        assert all(r.style == "replicate" for r in plan_policy(model, 2, "auto").modules if r.name == router), case
    # DeepSpeed's layout: the layer holding the gate and the experts' container runs on the whole sequence
    rows = {r.name: r for r in plan_policy(_DeepSpeedStyle(), 2, "auto", sequence_parallel=True).modules}
    assert rows["moe"].style == "sequence_whole" and rows["moe"].options == {"in_features": [16]}
    assert rows["moe.experts.deepspeed_experts.0.fc"].style == "column" and "moe.gate.wg" not in rows
    assert not any(r.style == "sequence_gather" and r.name.startswith("moe.") for r in rows.values())


def test_a_container_is_never_a_mixture_of_experts():
    """Blocks in an nn.ModuleDict beside a sibling holding a (n_entries, hidden) tensor (the next layer's
    gate): a container is never called, so it routes nothing; the real mixture of experts is found."""
    model = _MoEGPT()
    layers = torch.nn.ModuleList(
        torch.nn.ModuleDict({"ln1": b.ln1, "mlp": b.mlp, "ln2": b.ln2, "moe": b.moe}) for b in model.blocks
    )  # 4 entries each, as many as the experts of the gate in the other layer
    model.blocks = layers
    rows = {r.name: r.style for r in plan_policy(model, 2, "auto", sequence_parallel=True).modules}
    assert rows["blocks.0.moe"] == rows["blocks.1.moe"] == "sequence_whole" and "blocks" not in rows, rows
    assert rows["blocks.0.mlp"] == "sequence_gather", rows


def test_a_mixture_of_experts_inside_a_gathering_block_or_given_a_style_is_refused():
    class _Shared(torch.nn.Module):  # a shared MLP's layers are the layer's own children
        def __init__(self, d=16):
            super().__init__()
            self.fc, self.fc2, self.moe = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d), _TopTwo(d)

    model = _MoEGPT()
    model.blocks[0] = _Shared()
    with pytest.raises(PolicyError, match=r"'blocks.0.moe' \(a mixture of experts\) sits in block 'blocks.0'"):
        plan_policy(model, 2, "auto", sequence_parallel=True)
    model = _MoEGPT()
    model.blocks[0].moe.temperature = torch.nn.Parameter(torch.ones(1))  # a parameter of the layer itself
    policy = {**_auto_patterns(model), "blocks.0.moe": {"style": "replicate", "partial_grad": True}}
    with pytest.raises(PolicyError, match=r"'blocks.0.moe' routes tokens to experts.*'replicate' \{'partial_grad'"):
        plan_policy(model, 2, policy, sequence_parallel=True)


class _TopTwo(torch.nn.Module):
    """A mixture of experts as LitGPT's LLaMAMoE computes one: a gate scores the experts, each token
    goes to its two best, weighted by their softmax; the experts are MLPs in an nn.ModuleList."""

    def __init__(self, d, n=4):
        super().__init__()
        self.gate = torch.nn.Linear(d, n, bias=False)
        self.experts = torch.nn.ModuleList(_MLP(d) for _ in range(n))

    def forward(self, x):
        flat = x.reshape(-1, x.size(-1))
        probs, index = torch.topk(self.gate(flat), 2)
        probs = probs.softmax(-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            out = out.index_add(0, token, probs[token, slot, None] * expert(flat[token]))
        return out.view_as(x)


class _MoEBlock(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1, self.mlp, self.ln2, self.moe = torch.nn.LayerNorm(d), _MLP(d), torch.nn.LayerNorm(d), _TopTwo(d)

    def forward(self, x):
        x = x + self.mlp(self.ln1(x))
        return x + self.moe(self.ln2(x))


class _MoEGPT(torch.nn.Module):
    """Token and position embeddings, blocks of (norm, attention-free mixing MLP, norm, mixture of
    experts) with residuals, a final norm and a head."""

    def __init__(self, vocab=30, d=16, n_layers=2, ctx=16):
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(vocab, d), torch.nn.Embedding(ctx, d)
        self.blocks = torch.nn.ModuleList(_MoEBlock(d) for _ in range(n_layers))
        self.ln_f, self.head = torch.nn.LayerNorm(d), torch.nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[-1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _moe_sp_parity(tp):
    import copy

    m = _dist.mesh(tp)
    torch.manual_seed(0)
    dense = _MoEGPT().double()
    model = copy.deepcopy(dense)
    plan = apply_policy(model, m.tp_group, "auto", sequence_parallel=True)  # verify=True: the self-check passes
    styles = {r.name: r.style for r in plan.modules}
    g = torch.Generator().manual_seed(5 + m.dp_rank)
    ids, tgt = torch.randint(0, 30, (3, 12), generator=g), torch.randint(0, 30, (3, 12), generator=g)
    ld, lt = dense(ids), model(ids)
    models.loss_parity_backward(ld, lt, tgt, 30, TOL)
    _assert_any_length_without_grad(_forwards_without_grad(model, dense, tp, lengths=(5, 12)), tp)
    partial = sorted(n for n, p in model.named_parameters() if has_partial_grad(p))
    all_reduce_partial_grads(list(model.parameters()), m.tp_group)
    for pname, param in model.named_parameters():
        ref = dense.get_parameter(pname).grad
        spec = shard_spec(param)
        ref = spec.shard(ref, m.tp_rank) if spec is not None else ref
        torch.testing.assert_close(param.grad, ref, **TOL, msg=lambda s, n=pname: f"{n}: {s}")
    return styles, partial


@pytest.mark.parametrize(("world", "tp"), [(2, 2), (4, 4), (4, 2)], ids=["tp2", "tp4", "tp2xdp2"])
def test_a_mixture_of_experts_under_sequence_parallelism_matches_dense(world, tp):
    """Each mixture-of-experts layer runs on the whole sequence (its input gathered, its output split back),
    its experts split as MLPs with no sequence sharding inside and its gate whole with complete gradients;
    the rest of the model is sequence parallel. Logits and every gradient equal the dense model's."""
    for styles, partial in _dist.run(world, _moe_sp_parity, tp):
        assert styles["blocks.0.moe"] == "sequence_whole" and styles["blocks.0.mlp"] == "sequence_gather"
        assert styles["blocks.0.moe.experts.1.fc"] == "column" and styles["blocks.0.moe.gate"] == "replicate"
        assert "blocks.0.ln2.weight" in partial and not any(".moe." in n for n in partial), partial


def _first_layer_compiled(tp):
    """RopeGPT (the layer stack is the region) with only its first layer compiled: the region's entry (that
    layer's split) is traced and records no length; the other layers run eager (as where the compiler falls
    back, e.g. past its recompile limit). Logits without gradients at every length, and with them."""
    m = _dist.mesh(tp)
    torch.manual_seed(0)
    dense = models.RopeGPT().double()
    model = copy.deepcopy(dense)
    apply_policy(model, m.tp_group, "auto", sequence_parallel=True)
    torch.compiler.reset()
    model.blocks[0].compile(backend="eager", dynamic=False)
    g, out = torch.Generator().manual_seed(0), {}
    for T in (12, 11, 12, 1):
        ids = torch.randint(0, 30, (2, T), generator=g)
        with torch.no_grad():
            out[f"no_grad-{T}"] = float((gather_logits(model(ids)) - dense(ids)).abs().max())
    ids = torch.randint(0, 30, (2, 12), generator=g)
    out["grad-12"] = float((gather_logits(model(ids)).detach() - dense(ids).detach()).abs().max())
    return out


def test_an_entry_compiled_alone_decides_for_the_eager_layers_after_it():
    """A compiled entry of the sequence-sharded region records no length (traced code reads none); layers
    that run eager after it take its decision for the forward: an odd length without gradients runs whole
    (it was gathered as if a chunk: 2 x 11 tokens, a shape error)."""
    for r in _dist.run(2, _first_layer_compiled, 2):
        assert all(err < 1e-12 for err in r.values()), r


def _check_layer_holding_blocks_and_columns(tp, rope):
    from lightning_tp.engine.layers import ColumnParallelLinear

    m = _dist.mesh(tp)
    torch.manual_seed(0)
    dense = models.FairseqGPT(rope).double()
    model = copy.deepcopy(dense)
    plan = apply_policy(model, m.tp_group, "auto", sequence_parallel=True)  # verify=True passes
    g = torch.Generator().manual_seed(3)
    ids, tgt = torch.randint(0, 30, (2, 12), generator=g), torch.randint(0, 30, (2, 12), generator=g)
    ld = dense(ids)
    lt, counts = _counted_forward(model, ids)
    models.loss_parity_backward(ld, lt, tgt, 30, TOL)
    _assert_grads_match_dense(model, dense, m)
    _assert_any_length_without_grad(_forwards_without_grad(model, dense, tp), tp)
    fc1 = model.layers[0].fc1
    return {
        "styles": {r.name: r.style for r in plan.modules},
        "fc1_gathers": isinstance(fc1, ColumnParallelLinear) and fc1.sequence_parallel and fc1.sequence_gather is None,
        "reduce_scatters": counts.get("reduce_scatter_tensor", 0) + counts.get("reduce_scatter_single", 0),
        "partial": sorted(n for n, p in model.named_parameters() if has_partial_grad(p)),
    }


@pytest.mark.parametrize("rope", [False, True], ids=["split_at_embeddings", "layer_stack"])
@pytest.mark.parametrize("tp", [2, 4])
def test_a_layer_holding_its_attention_block_and_its_mlp_linears_runs_sequence_parallel(tp, rope):
    """A layer that holds another block and column layers of its own (OPT's, BART's, Whisper's decoder
    layer: fc1/fc2 beside self_attn) carries the residual stream: it does not gather the sequence at its
    input (its attention block does); fc1 gathers its own input, as Megatron's column layers do, and
    fc2 reduce-scatters. Tokens flattened to (B*T, d) for the MLP, as OPT flattens them, are told whole
    or sharded in a forward without gradients. Logits and every gradient equal the dense model's
    (float64). Before: the layer gathered at its input, and the rewritten model failed its self-check."""
    for r in _dist.run(tp, _check_layer_holding_blocks_and_columns, tp, rope):
        styles = r["styles"]
        assert styles["layers.0.self_attn"] == "sequence_gather" and styles["layers.0.fc1"] == "column"
        assert styles.get("layers.1", "replicate") != "sequence_gather" and r["fc1_gathers"], styles
        assert r["reduce_scatters"] >= 4  # each layer's o_proj and fc2
        norms = [
            f"layers.{i}.{n}.{p}" for i in range(2) for n in ("attn_norm", "final_norm") for p in ("bias", "weight")
        ]
        assert set(norms) <= set(r["partial"]), r["partial"]


class _LatentAttention(torch.nn.Module):
    """Multi-head latent attention written anew (DeepSeek-V2's layout under other names): whole linear
    layers compress the hidden states, column layers expand the compressed ones into this rank's heads,
    and ``rope`` features of the key/value compression (``down_kv``'s last outputs) reach every head."""

    def __init__(self, d=32, n_heads=4, q_rank=12, kv_rank=10, rope=4, v_head_dim=8):
        super().__init__()
        self.kv_rank, self.rope, self.v_head_dim = kv_rank, rope, v_head_dim
        self.down_q = torch.nn.Linear(d, q_rank, bias=False)
        self.up_q = torch.nn.Linear(q_rank, n_heads * (v_head_dim + rope), bias=False)
        self.down_kv = torch.nn.Linear(d, kv_rank + rope, bias=False)
        self.kv_norm = torch.nn.RMSNorm(kv_rank)
        self.up_kv = torch.nn.Linear(kv_rank, n_heads * 2 * v_head_dim, bias=False)
        self.out = torch.nn.Linear(n_heads * v_head_dim, d, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.up_q(self.down_q(x)).view(B, T, -1, self.v_head_dim + self.rope).transpose(1, 2)
        c, shared = self.down_kv(x).split([self.kv_rank, self.rope], -1)
        k, v = self.up_kv(self.kv_norm(c)).view(B, T, -1, 2 * self.v_head_dim).transpose(1, 2).chunk(2, -1)
        k = torch.cat([k, shared[:, None].expand(-1, k.shape[1], -1, -1)], -1)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


class _LatentGPT(models.PlainGPT):
    def __init__(self):
        super().__init__(d=32, n_heads=4)
        for layer in self.layers:
            layer.attn = _LatentAttention()


def _check_latent_attention(tp):
    m = _dist.mesh(tp)
    torch.manual_seed(0)
    dense = _LatentGPT().double()
    model = copy.deepcopy(dense)
    policy = {
        **{n: s for n, s in _auto_patterns(model).items() if ".attn." not in n},
        "layers.*.attn.up_q": "column",
        "layers.*.attn.up_kv": "column",
        "layers.*.attn.down_kv": {"style": "replicate", "partial_output": 4},
        "layers.*.attn.out": "row",
    }
    plan = apply_policy(model, m.tp_group, policy, sequence_parallel=True)  # verify=True passes
    g = torch.Generator().manual_seed(3)
    ids, tgt = torch.randint(0, 30, (2, 12), generator=g), torch.randint(0, 30, (2, 12), generator=g)
    models.loss_parity_backward(dense(ids), model(ids), tgt, 30, TOL)
    _assert_grads_match_dense(model, dense, m)
    _assert_any_length_without_grad(_forwards_without_grad(model, dense, tp), tp)
    return {r.name: (r.style, r.options) for r in plan.modules}


@pytest.mark.parametrize("tp", [2, 4])
def test_latent_attention_runs_sequence_parallel(tp):
    """Multi-head latent attention under sequence parallelism: its block gathers the hidden states for
    its whole compressing layers as well as the compressed widths its column layers read; inside the
    gathering block every column layer leaves its input gradient partial for the gather to sum, so the
    compression whose tail reaches the heads (``partial_output``) has a partial gradient as a whole
    (``partial_grad``, no sum of the tail's alone). Logits and every gradient equal the dense model's
    (float64). Before: refused ("partial_output ... which sequence parallelism does not handle")."""
    for styles in _dist.run(tp, _check_latent_attention, tp):
        assert styles["layers.0.attn"] == ("sequence_gather", {"in_features": [10, 12, 32]}), styles["layers.0.attn"]
        assert styles["layers.1.attn.down_kv"] == ("replicate", {"partial_grad": True})
        assert styles["layers.1.attn.down_q"] == ("replicate", {"partial_grad": True})
        assert styles["layers.1.attn.kv_norm"] == ("replicate", {"partial_grad": True})


@pytest.mark.skipif(not HAS_HF, reason="transformers (extra 'hf') not installed")
def test_the_layer_stack_is_read_from_a_meta_model_whose_forward_checks_for_padding():
    """Where the sequence is split is read from a forward up to the first layer, on meta tensors for a
    model built on the meta device (deferred init). Hugging Face's padding warning runs
    ``pad_token_id in input_ids[:, [-1, 0]]`` (GPT-2 with a pad token): on meta tensors that is taken as
    False like the other data-dependent values. Before, the forward failed ("Tensor.item() cannot be
    called on meta tensors"), the split fell back to the embeddings with a PolicyWarning, and GPT-2's
    block-by-block verify refused the model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_tp.policy import PolicyWarning

    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, pad_token_id=0)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PolicyWarning)
        plan = plan_policy(model, 2, "auto", sequence_parallel=True, example_input={"input_ids": ids})
    assert [r.name for r in plan.modules if r.style == "sequence_stack"] == ["transformer.h.0", "transformer.h.1"]


def _flattened_token_gathers():
    from lightning_tp.engine.comm import enter_sequence_region, leave_sequence_region, reset_sequence_region
    from lightning_tp.engine.sequence import SequenceGather

    m = _dist.mesh(2)
    gather = SequenceGather(m.tp_group, [4], ndim=3)  # a layer stack's block: hidden states (B, T/p, 4)
    reset_sequence_region()
    try:
        enter_sequence_region(torch.zeros(2, 8, 4), m.tp_group, "layers.0")  # B 2, T 8: chunks of 4, 8 tokens
        rows = torch.arange(8 * 4, dtype=torch.float64).view(8, 4) + 100 * m.tp_rank  # (B*T/p, 4)
        per_sample = torch.ones(2, 4, dtype=torch.float64)  # (B, 4): a conditioning vector, not tokens
        mask = torch.zeros(4, 4, dtype=torch.float64)  # (T/p, 4)
        (flat, cond, other), _ = gather._pre(None, (rows, per_sample, mask), {})
    finally:
        leave_sequence_region()
    return flat.shape, bool(torch.equal(flat[8:] - flat[:8], torch.full((8, 4), 100.0))), cond.shape, other.shape


def test_only_the_flattened_tokens_of_this_rank_are_gathered_as_two_dimensional_inputs():
    """Where the layer stack is the region, a block's gather takes tensors of the hidden states' rank,
    and 2-D ones only with as many rows as this rank's tokens flattened with the batch (B*T/p): a
    per-sample (B, d) vector or another 2-D tensor as wide as the hidden states passes whole."""
    for flat, rank_major, cond, other in _dist.run(2, _flattened_token_gathers):
        assert flat == (16, 4) and rank_major and cond == (2, 4) and other == (4, 4)


def test_per_head_parameters_of_a_layer_holding_blocks_and_columns_are_refused_under_sequence_parallelism():
    """A layer that holds its attention block and column layers of its own gathers nothing under sequence
    parallelism; per-head parameters split on it (``head_params``) would leave its whole parameters
    without partial gradients: refused before any change, naming the module."""
    model = models.FairseqGPT(rope=False).double()
    for layer in model.layers:
        layer.gate = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    policy = {
        **_auto_patterns(model),
        **{f"layers.{i}": {"style": "head_params", "params": {"gate": 0}} for i in (0, 1)},
    }
    plan_policy(model, 2, policy)  # without sequence parallelism: split with the heads
    with pytest.raises(PolicyError, match=r"'layers.0' holds per-head parameters .* sequence_parallel=False"):
        plan_policy(model, 2, policy, sequence_parallel=True)
