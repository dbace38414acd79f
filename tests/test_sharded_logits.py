"""Vocab-sharded logits are never silently wrong: F.cross_entropy / nn.CrossEntropyLoss (and so a Hugging
Face model's own ``labels=`` loss) run the vocab-parallel loss; every op needing the whole vocabulary sees
the gathered logits; in-place ops that cannot run on a shard raise."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import _dist
from lightning_tp import ShardingError, VocabShardedLogits, apply_policy, gather_logits
from lightning_tp.engine.layers import VocabParallelLMHead

HAS_HF = importlib.util.find_spec("transformers") is not None
hf = pytest.mark.skipif(not HAS_HF, reason="transformers (extra 'hf') not installed")
V = 13  # not divisible by 2 or 4: padded shards


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def _head_and_batch(tp: int, seq: int):
    """A dense float64 LM head (8 -> V), its vocab-parallel copy at TP ``tp``, inputs ``(2, seq, 8)`` and targets."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(8, V, bias=False).double()
    head = VocabParallelLMHead.from_dense(dense, _dist.mesh(tp).tp_group, gather_output=False)
    x = torch.randn(2, seq, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, V, (2, seq), generator=torch.Generator().manual_seed(2))
    return dense, head, x, y


def _ops(tp):
    dense, head, x, y = _head_and_batch(tp, 5)
    y[0, 0] = 3
    d, s = dense(x), head(x)
    assert isinstance(s, VocabShardedLogits) and s.shape[-1] < V
    # the losses people write, unchanged: routed to the vocab-parallel loss
    flat = s.float().double().view(-1, V)  # Hugging Face's view with the full vocabulary
    assert isinstance(flat, VocabShardedLogits) and flat.shape[-1] == s.shape[-1]
    for kw in ({}, {"ignore_index": 3}, {"label_smoothing": 0.1}, {"reduction": "sum"}, {"reduction": "none"}):
        _close(F.cross_entropy(s.view(-1, V), y.view(-1), **kw), F.cross_entropy(d.view(-1, V), y.view(-1), **kw))
        _close(torch.nn.CrossEntropyLoss(**kw)(s.reshape(-1, s.size(-1)), y.view(-1)),
               torch.nn.CrossEntropyLoss(**kw)(d.reshape(-1, V), y.view(-1)))  # fmt: skip
    w = torch.rand(V, dtype=torch.float64)
    _close(F.cross_entropy(s.view(-1, V), y.view(-1), weight=w), F.cross_entropy(d.view(-1, V), y.view(-1), weight=w))
    # ops that need the whole vocabulary see the gathered logits
    assert torch.equal(s.argmax(-1), d.argmax(-1))
    assert torch.equal(torch.topk(s, 3).indices, torch.topk(d, 3).indices)
    assert torch.equal(s.sort(-1).indices, d.sort(-1).indices)
    _close(s.softmax(-1), d.softmax(-1))
    _close(F.log_softmax(s, dim=-1), F.log_softmax(d, dim=-1))
    _close(s.max(-1).values, d.max(-1).values)
    _close(s.reshape(-1), d.reshape(-1))  # merges the vocabulary dim: done on the dense logits
    _close(s.transpose(1, 2), d.transpose(1, 2))
    g = torch.Generator().manual_seed(0)
    samples = torch.multinomial(s[:, -1].softmax(-1), 4, generator=g)
    assert torch.equal(samples, torch.multinomial(d[:, -1].softmax(-1), 4, generator=torch.Generator().manual_seed(0)))
    # position slices, casts and scalar elementwise ops (temperature, soft-capping) stay sharded
    for t in (s[:, -1, :], s / 0.7, torch.tanh(s / 3.0) * 3.0, s.float(), s[..., :-1, :].contiguous()):
        assert isinstance(t, VocabShardedLogits)
    _close((torch.tanh(s / 3.0) * 3.0).softmax(-1), (torch.tanh(d / 3.0) * 3.0).softmax(-1))
    assert "of 13 vocabulary columns" in repr(s)  # printing is local: no collective
    with pytest.raises(ShardingError, match=r"in-place 'masked_fill_' on vocab-sharded logits.*gather_logits"):
        s.clone().masked_fill_(torch.zeros(s.shape, dtype=torch.bool), 0.0)
    with pytest.raises(ShardingError, match=r"in-place '__setitem__'"):
        s.clone()[..., 0] = 1.0
    # review findings: slices/casts that only look like the local width, caches, formatting, copies
    m_local = s.shape[-1]
    _close(s[..., 0], d[..., 0])
    _close(s[..., :m_local], d[..., :m_local])
    _close(s[..., torch.arange(m_local)], d[..., torch.arange(m_local)])
    mask = torch.ones(2, m_local, dtype=torch.bool)
    assert not isinstance(mask.to(s), VocabShardedLogits) and not isinstance(mask.type_as(s), VocabShardedLogits)
    assert "vocabulary columns" in f"{s}"
    buf = torch.empty_like(d)
    buf.copy_(s)
    _close(buf, d)
    t = s.detach().clone()
    t.transpose(1, 2)[:, 3] = 1e9  # writes into the gathered copy, not into t
    assert torch.equal(t.argmax(-1), d.argmax(-1))
    xd, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    ls = head(xs)
    with torch.no_grad():
        ls.argmax(-1)  # gathered without autograd first
    (F.cross_entropy(ls.view(-1, V), y.view(-1)) + (ls.softmax(-1) ** 2).sum()).backward()
    ld = dense(xd)
    (F.cross_entropy(ld.view(-1, V), y.view(-1)) + (ld.softmax(-1) ** 2).sum()).backward()
    _close(xs.grad, xd.grad)
    with torch.inference_mode():  # Lightning's evaluation loops on GPUs: tensors without a version counter
        si, di = head(x), dense(x)
        assert isinstance(si, VocabShardedLogits) and si.is_inference()
        for op in (lambda z: z.argmax(-1), lambda z: z.softmax(-1), lambda z: F.log_softmax(z, -1),
                   lambda z: torch.topk(z, 3).values, lambda z: z.softmax(-1).argmax(-1)):  # fmt: skip
            _close(op(si), op(di))
            _close(op(si), op(di))  # again: nothing gathered before is reused without a version to check
        _close(gather_logits(si), di)
        _close(F.cross_entropy(si.view(-1, V), y.view(-1)), F.cross_entropy(di.view(-1, V), y.view(-1)))
    # gradients through the routed loss and through gathered ops equal the dense ones
    for loss_fn in (lambda z: F.cross_entropy(z.view(-1, V), y.view(-1), label_smoothing=0.1),
                    lambda z: z.log_softmax(-1)[..., 3].sum() + z.max(-1).values.sum()):  # fmt: skip
        xd, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss_fn(dense(xd)).backward()
        loss_fn(head(xs)).backward()
        _close(xs.grad, xd.grad)
    return True


@pytest.mark.parametrize(("world", "tp"), [(2, 2), (4, 4)])
def test_sharded_logits_behave_like_dense(world, tp):
    assert all(_dist.run(world, _ops, tp))


def _chunked_losses(tp):
    """Losses that split the logits along the tokens (LitGPT's chunked cross entropy) or join chunks of them:
    each piece stays sharded (no gather at all), values and gradients are the dense ones."""
    import lightning_tp.engine.comm as comm

    dense, head, x, y = _head_and_batch(tp, 6)
    y[1, 2] = -100

    def chunked(z, t):  # split / chunk / tensor_split / unbind over tokens, one loss per piece
        flat, tf = z.reshape(-1, z.size(-1)), t.reshape(-1)
        pieces = [*flat.split(5), *torch.chunk(flat, 2), *flat.tensor_split(3), *z.unbind(0)]
        targets = [*tf.split(5), *torch.chunk(tf, 2), *tf.tensor_split(3), *t.unbind(0)]
        assert all(isinstance(p, VocabShardedLogits) for p in pieces) == isinstance(z, VocabShardedLogits)
        losses = [F.cross_entropy(p, q, reduction="none") for p, q in zip(pieces, targets, strict=True)]
        return torch.cat(losses).sum() / (tf != -100).sum()

    def joined(z, t):  # the chunks of a chunked LM head, concatenated over the sequence
        whole = torch.cat([z[:, :4], z[:, 4:]], dim=1)
        assert isinstance(whole, VocabShardedLogits) == isinstance(z, VocabShardedLogits)
        return F.cross_entropy(whole.reshape(-1, V), t.reshape(-1))

    gathers = []
    original = comm.gather_from_tp
    comm.gather_from_tp = lambda *a, **k: gathers.append(1) or original(*a, **k)
    try:
        fns = [chunked, joined]
        if importlib.util.find_spec("litgpt") is not None:
            from litgpt.utils import chunked_cross_entropy

            fns += [lambda z, t: chunked_cross_entropy(z, t, chunk_size=5),
                    lambda z, t: chunked_cross_entropy([z[:, :3], z[:, 3:]], t, chunk_size=3)]  # fmt: skip
        for fn in fns:
            xd, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
            ld, ls = fn(dense(xd), y), fn(head(xs), y)
            ld.backward(), ls.backward()
            _close(ls, ld)
            _close(xs.grad, xd.grad)
        assert gathers == [], "a chunked loss gathered the logits"
        # a split or join of the vocabulary dim itself needs the dense logits: gathered, still right (review
        # findings: numpy's axis= spelling, an out= buffer, a property set on the logits)
        s, d = head(x).detach(), dense(x).detach()
        _close(torch.cat(s.split(4, dim=-1), dim=-1), d)
        assert gathers
        for got, want in ((torch.chunk(s, 2, axis=-1), torch.chunk(d, 2, axis=-1)), (s.unbind(axis=2), d.unbind(2)),
                          ([torch.cat([s, s], axis=-1)], [torch.cat([d, d], -1)]),
                          ([torch.concatenate([s, s], axis=2)], [torch.concatenate([d, d], axis=2)])):  # fmt: skip
            assert len(got) == len(want) and not any(isinstance(g, VocabShardedLogits) for g in got)
            for g, w in zip(got, want, strict=True):
                _close(g, w)
        assert all(isinstance(p, VocabShardedLogits) for p in torch.chunk(s, 2, axis=0))
        buf = torch.empty(4, 6, V, dtype=torch.float64)
        torch.cat([s, s], dim=0, out=buf)
        _close(buf, torch.cat([d, d]))
        t = head(x).detach()
        t.requires_grad = True
        assert t.requires_grad and isinstance(t, VocabShardedLogits)
    finally:
        comm.gather_from_tp = original
    return True


def test_chunked_losses_keep_the_logits_sharded():
    assert all(_dist.run(2, _chunked_losses, 2))


def _vocab_reductions(tp):
    """logsumexp (a z-loss) and argmax (accuracy) over the vocabulary run on the shards, with no gather: the
    dense values, logsumexp's gradient, keepdim, padding, ties (the first maximum), NaN and all--inf rows,
    compiled too."""
    import lightning_tp.engine.comm as comm

    dense, head, x, y = _head_and_batch(tp, 6)
    gathers = []
    original = comm.gather_from_tp
    comm.gather_from_tp = lambda *a, **k: gathers.append(1) or original(*a, **k)
    try:

        def z_loss(z):  # PaLM / OLMo's z-loss plus the cross entropy, as a LightningModule writes it
            return F.cross_entropy(z.reshape(-1, V), y.reshape(-1)) + 1e-2 * z.logsumexp(-1).pow(2).mean()

        def traced(mdl, inputs):  # the head and the loss compiled together: the reduction is traced
            return z_loss(mdl(inputs))

        for fn in (lambda mdl, xx: z_loss(mdl(xx)), lambda mdl, xx: torch.logsumexp(mdl(xx), dim=2, keepdim=True).sum(),
                   torch.compile(traced, backend="aot_eager", fullgraph=True)):  # fmt: skip
            xd, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
            ld, ls = fn(dense, xd), fn(head, xs)
            ld.backward(), ls.backward()
            _close(ls, ld)
            _close(xs.grad, xd.grad)
            _close(head.weight.grad, head.weight_spec.shard(dense.weight.grad, _dist.mesh(tp).tp_rank))
            head.zero_grad(), dense.zero_grad()

        def sharded(local):
            return VocabShardedLogits.wrap(local, head.group, V)

        s = sharded(head(x).detach().as_subclass(torch.Tensor).round())  # ties across the ranks' columns
        d = gather_logits(s)
        gathers.clear()
        assert torch.equal(s.argmax(-1), d.argmax(-1)) and torch.equal(torch.argmax(s, dim=2, keepdim=True),
                                                                       d.argmax(2, keepdim=True))  # fmt: skip
        assert torch.equal(s.bfloat16().argmax(-1), d.bfloat16().argmax(-1))
        _close(s.logsumexp(-1), d.logsumexp(-1))
        local = s.as_subclass(torch.Tensor).clone()
        if _dist.mesh(tp).tp_rank == 0:
            local[0, 0, -1] = float("nan")  # rank 0's last column
        local[0, 1] = float("-inf")  # every column
        local[1, 0, :] = 5.0  # a tie on every rank
        local[1, 1, 0] = float("inf")  # +inf on rank 0: logsumexp +inf (torch's), its gradient NaN there, 0 elsewhere
        odd = sharded(local)
        assert gathers == [], "a vocabulary reduction gathered the logits"
        dense_odd = gather_logits(odd)
        assert torch.equal(odd.argmax(-1), dense_odd.argmax(-1))
        torch.testing.assert_close(odd.logsumexp(-1), dense_odd.logsumexp(-1), equal_nan=True, atol=1e-12, rtol=1e-12)
        leaf_s, leaf_d = local.clone().requires_grad_(), gather_logits(odd).clone().requires_grad_()
        sharded(leaf_s).logsumexp(-1)[1].sum().backward()
        leaf_d.logsumexp(-1)[1].sum().backward()
        torch.testing.assert_close(
            leaf_s.grad[1], _shard_last(leaf_d.grad[1], tp), equal_nan=True, atol=1e-12, rtol=1e-12
        )
        # keepdims (numpy's spelling), torch.special, integer logits (gathered, as torch computes them)
        assert odd.logsumexp(-1, keepdims=True).shape == (2, 6, 1) and s.argmax(-1, keepdims=True).shape == (2, 6, 1)
        _close(torch.special.logsumexp(s, -1), torch.special.logsumexp(d, -1))
        ints = sharded(s.as_subclass(torch.Tensor).long())
        assert torch.equal(ints.argmax(-1), gather_logits(ints).argmax(-1))
        # dense logits kept by an earlier gather (a softmax on every rank): no collective at all, as before
        s.softmax(-1)
        import torch.distributed as dist

        calls = []
        names = [n for n in ("all_reduce", "all_gather_into_tensor", "all_gather_single", "all_gather", "broadcast")
                 if hasattr(dist, n)]  # fmt: skip
        saved = {n: getattr(dist, n) for n in names}
        for n in names:
            setattr(dist, n, (lambda f: lambda *a, **k: calls.append(f.__name__) or f(*a, **k))(saved[n]))
        try:
            s.argmax(-1), s.logsumexp(-1)
            assert calls == [], calls
            sharded(s.as_subclass(torch.Tensor)).argmax(-1)  # (the counting sees the collectives of new logits)
            assert calls, calls
        finally:
            for n in names:
                setattr(dist, n, saved[n])
        # other dims, or no dim: the gathered logits answer
        assert torch.equal(s.argmax(), d.argmax()) and torch.equal(s.argmax(0), d.argmax(0))
        _close(s.logsumexp(0), d.logsumexp(0))
    finally:
        comm.gather_from_tp = original
    return True


def _shard_last(dense, tp):
    """This rank's columns of ``dense`` (..., V) laid out as the head's shard (padded)."""
    from lightning_tp.engine.sharding import ShardSpec

    return ShardSpec(dim=-1, sizes=(V,), tp_size=tp, pad=True).shard(dense, _dist.mesh(tp).tp_rank)


def test_logsumexp_and_argmax_over_the_vocabulary_stay_sharded():
    for world in (2, 4):
        assert all(_dist.run(world, _vocab_reductions, world))


def _vocab_reductions_tp1():
    """At TP 1 torch's own ops on the valid columns: the same values, double backward and forward-mode AD."""
    dense, head, x, _ = _head_and_batch(1, 4)
    z = head(x).detach().as_subclass(torch.Tensor).requires_grad_()
    s = VocabShardedLogits.wrap(z, head.group, V)
    (g,) = torch.autograd.grad(s.logsumexp(-1).pow(2).sum(), z, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), z)
    zd = dense(x).detach().requires_grad_()
    (gd,) = torch.autograd.grad(zd.logsumexp(-1).pow(2).sum(), zd, create_graph=True)
    (ggd,) = torch.autograd.grad(gd.pow(2).sum(), zd)
    _close(g, gd)
    _close(gg, ggd)
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        tangent = torch.ones_like(z)
        out = VocabShardedLogits.wrap(fwad.make_dual(z.detach(), tangent), head.group, V).logsumexp(-1)
        _close(fwad.unpack_dual(out).tangent, torch.ones(2, 4, dtype=torch.float64))
    assert torch.equal(s.argmax(-1), zd.argmax(-1))
    return True


def test_logsumexp_and_argmax_at_tp1_are_torchs():
    assert all(_dist.run(1, _vocab_reductions_tp1))


def _hf_llama_own_loss(tp):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = _dist.mesh(tp)
    cfg = LlamaConfig(vocab_size=66, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      attn_implementation="eager", tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    dense = LlamaForCausalLM(cfg).double()
    model = LlamaForCausalLM(cfg).double()
    model.load_state_dict(dense.state_dict())
    apply_policy(model, m.tp_group, "auto")
    ids = torch.randint(0, 66, (2, 9), generator=torch.Generator().manual_seed(4))  # B*T even: view(-1, V) ambiguous
    out = model(input_ids=ids, labels=ids)
    ref = dense(input_ids=ids, labels=ids)
    assert isinstance(out.logits, VocabShardedLogits)  # the default: logits stay sharded, the loss is parallel
    _close(out.loss, ref.loss)
    out.loss.backward()
    ref.loss.backward()
    from lightning_tp.engine.comm import all_gather_dim
    from lightning_tp.engine.sharding import shard_spec

    spec, grad = shard_spec(model.model.embed_tokens.weight), model.model.embed_tokens.weight.grad
    fp32 = {"atol": 1e-6, "rtol": 1e-5}  # Hugging Face's loss casts the logits to float32
    got = spec.unshard(list(all_gather_dim(grad, m.tp_group, 0).chunk(tp)))
    torch.testing.assert_close(got, dense.model.embed_tokens.weight.grad, **fp32)
    torch.testing.assert_close(model.model.norm.weight.grad, dense.model.norm.weight.grad, **fp32)
    gen = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, dense.generate(ids[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0))
    return True


@hf
def test_hf_own_labels_loss_and_generate_on_sharded_logits():
    assert all(_dist.run(2, _hf_llama_own_loss, 2))
