"""Word dropout and R-Drop (tfx/nn/regularisers.py) against their definitions: the fraction and the
scale of the dropped embeddings, no effect (and no random draw) at eval or p = 0, no gradient
through a dropped position, the markers kept; R-Drop's KL term by hand with F.kl_div, padding
left out, the plain loss and gradient without dropout, two different dropout masks per batch, and
`tfx train` end to end with it for a translation model and a classifier."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import run_tfx, tfx_in_process
from tfx.config import validate
from tfx.errors import UsageError
from tfx.families import build_model
from tfx.nn import regularisers
from tfx.nn.regularisers import SPECIAL_IDS, rdrop_loss, symmetric_kl
from tfx.nn.stack import TransformerStack

V = 20  # tokenizer ids; the encoder families add [MASK] = 20
PAD, BOS, EOS, MASK = 0, 1, 2, V
FAMILIES = ("lm", "seq2seq", "classifier", "mlm")


def model(family: str, tmp_path, *, dropout: float = 0.0, **train):
    (tmp_path / "labels.json").write_text('["a", "b", "c"]')
    layers = {"encoder_layers": 1, "decoder_layers": 1} if family == "seq2seq" else {"n_layers": 1}
    recipe = validate({"family": family, "data": {"train": "x"}, "train": train,
                       "model": {"d_model": 16, "n_heads": 2, "context": 32, "dropout": dropout, **layers}})
    torch.manual_seed(0)
    return build_model(recipe, vocab_size=V, run_dir=tmp_path).double().train()


def batch(family: str, rows: int = 4, length: int = 12, seed: int = 0) -> dict:
    """Words in 3..V-1; a BOS ([CLS]) in front where the family puts one, EOS and padding at the end."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(3, V, (rows, length), generator=g)
    padded = words.clone()
    padded[:, -1], padded[1:, -3:] = EOS, PAD  # rows 1.. are shorter
    if family == "lm":
        return {"input": words, "target": torch.roll(words, -1, 1)}
    if family == "mlm":
        target = torch.where(torch.rand(words.shape, generator=g) < 0.3, words, -100)
        target[0, 0] = words[0, 0]
        return {"input": torch.where(target != -100, MASK, words), "target": target}
    if family == "classifier":
        tokens = torch.cat([torch.full((rows, 1), BOS), padded], 1)
        return {"input": tokens, "mask": tokens != PAD, "label": torch.arange(rows) % 3}
    tgt = torch.cat([torch.full((rows, 1), BOS), padded[:, :-1]], 1)
    return {"src": padded, "src_mask": padded != PAD, "tgt_in": tgt,
            "tgt_out": torch.where(tgt == PAD, -100, torch.roll(tgt, -1, 1))}


def stacks(m) -> list[TransformerStack]:
    return [s for s in m.modules() if isinstance(s, TransformerStack)]


def capture(m) -> list[tuple]:
    """(tokens, embeddings in, embeddings out) of every word-dropout call of the model's stacks."""
    seen = []
    for s in stacks(m):
        s.word_drop.register_forward_hook(lambda mod, args, out: seen.append((args[1], args[0], out)))
    return seen


def test_the_kept_ids_are_the_tokenizers_markers():
    from tfx.data.tokenizers import Tokenizer

    assert SPECIAL_IDS == (Tokenizer.pad_id, Tokenizer.bos_id, Tokenizer.eos_id)


@pytest.mark.parametrize("family", FAMILIES)
def test_word_dropout_zeroes_p_of_every_stacks_words_scales_the_rest_and_keeps_the_markers(family, tmp_path):
    p = 0.3
    m = model(family, tmp_path, word_dropout=p)
    seen = capture(m)
    torch.manual_seed(1)
    m.loss(batch(family, rows=64, length=24))
    assert len(seen) == len(stacks(m)) == (2 if family == "seq2seq" else 1)  # source and target input
    for tokens, x, out in seen:
        marker = torch.isin(tokens, torch.tensor([PAD, BOS, EOS, MASK]))
        zero = (out == 0).all(-1)
        assert torch.equal(out[marker], x[marker])  # [CLS]/BOS, EOS, pad and [MASK]: never dropped
        words = int((~marker).sum())
        assert words > 900 and abs(int(zero[~marker].sum()) / words - p) < 4 * math.sqrt(p * (1 - p) / words)
        kept = ~marker & ~zero
        torch.testing.assert_close(out[kept], x[kept] / (1 - p), rtol=1e-12, atol=0)  # inverted dropout


def without_word_dropout(m):
    """The model as it was before word dropout existed: its stacks' embeddings go straight through."""
    for s in stacks(m):
        del s.word_drop
        s.word_drop = lambda x, tokens: x
    return m


@pytest.mark.parametrize("family", FAMILIES)
def test_word_dropout_changes_nothing_at_eval_or_at_zero_and_draws_no_random_number(family, tmp_path):
    b = batch(family)
    plain = without_word_dropout(model(family, tmp_path, dropout=0.2))
    zero, on = (model(family, tmp_path, dropout=0.2, word_dropout=p) for p in (0.0, 0.5))
    losses = []
    for m in (plain, zero, model(family, tmp_path, dropout=0.2)):  # without the key: p = 0
        torch.manual_seed(3)  # training with dropout: the same masks, so p = 0 drew no random number
        losses.append(m.loss(b)[0])
    assert torch.equal(losses[0], losses[1]) and torch.equal(losses[0], losses[2])
    plain.eval(), on.eval()
    assert torch.equal(plain.loss(b)[0], on.loss(b)[0])


def test_a_dropped_token_gets_no_gradient_from_its_position(tmp_path):
    m = model("classifier", tmp_path, word_dropout=0.5)
    tokens = torch.cat([torch.tensor([[BOS]]), torch.arange(3, V)[None], torch.tensor([[EOS]])], 1)  # each id once
    seen = capture(m)
    torch.manual_seed(0)
    m.loss({"input": tokens, "mask": tokens != PAD, "label": torch.tensor([1])})[0].backward()
    dropped = (seen[0][2] == 0).all(-1)[0]
    assert 0 < int(dropped.sum()) < V - 3
    grad = m.encoder.embed.weight.grad
    assert (grad[tokens[0, dropped]] == 0).all()  # the only use of those rows: nothing flows back
    assert (grad[tokens[0, ~dropped]].abs().sum(-1) > 0).all()


def test_symmetric_kl_is_half_the_two_kls_by_f_kl_div_over_the_unmasked_positions():
    g = torch.Generator().manual_seed(0)
    l1, l2 = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64).unbind(0)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False], [True] + [False] * 4])
    lp1, lp2 = F.log_softmax(l1, -1), F.log_softmax(l2, -1)
    kl12 = F.kl_div(lp2, lp1, log_target=True, reduction="none").sum(-1)  # KL(p1 || p2)
    kl21 = F.kl_div(lp1, lp2, log_target=True, reduction="none").sum(-1)
    hand = 0.5 * (kl12 + kl21)[mask].sum()
    torch.testing.assert_close(symmetric_kl(l1, l2, mask), hand, rtol=1e-12, atol=0)
    torch.testing.assert_close(symmetric_kl(l1[mask], l2[mask]), hand, rtol=1e-12, atol=0)
    moved = l1.clone()
    moved[1, 3] += 5.0 * torch.randn(7, generator=g, dtype=torch.float64)  # a padded position
    assert torch.equal(symmetric_kl(moved, l2, mask), symmetric_kl(l1, l2, mask))
    assert float(symmetric_kl(l1, l1, mask)) == 0.0


def test_rdrop_loss_is_half_the_papers_equation_3():
    g = torch.Generator().manual_seed(1)
    l1, l2 = torch.randn(2, 6, 5, generator=g, dtype=torch.float64).unbind(0)
    y = torch.tensor([0, 4, -100, 2, 2, 1])

    def ce(logits):
        return F.cross_entropy(logits, y, reduction="sum", label_smoothing=0.1)

    alpha = 3.0
    paper = ce(l1) + ce(l2) + alpha * symmetric_kl(l1, l2, y != -100)
    torch.testing.assert_close(rdrop_loss(l1, l2, y, alpha, label_smoothing=0.1), paper / 2)
    torch.testing.assert_close(rdrop_loss(l1, l2, y, 0.0, label_smoothing=0.1), (ce(l1) + ce(l2)) / 2)
    torch.testing.assert_close(rdrop_loss(l1, l1, y, alpha, label_smoothing=0.1), ce(l1))  # no KL: the plain loss


@pytest.mark.parametrize("family", FAMILIES)
def test_rdrop_without_dropout_is_the_plain_loss_and_gradient_with_a_zero_kl(family, tmp_path, monkeypatch):
    kls = []
    monkeypatch.setattr(regularisers, "symmetric_kl",
                        lambda *a, f=regularisers.symmetric_kl: kls.append(f(*a)) or kls[-1])
    plain, twice = model(family, tmp_path), model(family, tmp_path, rdrop=2.0)
    b = batch(family)
    ours, ref = twice.loss(b)[0], plain.loss(b)[0]
    # the two halves of one pass are the same numbers, up to float64 rounding (a matmul's blocking may
    # differ between rows of the stacked batch: 5e-33 was seen once for mlm)
    assert len(kls) == 1 and abs(float(kls[0].detach())) < 1e-20
    # the classifier's plain loss is float32 even for a float64 model: compare at float32's precision there
    tol = dict(rtol=1e-12, atol=1e-12) if ref.dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours, ref.to(ours.dtype), **tol)
    ours.backward(), ref.backward()
    for (name, a), b_ in zip(twice.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b_.grad, **tol, msg=name)
    twice.eval()  # validation: one plain pass
    assert torch.equal(twice.loss(b)[0], plain.eval().loss(b)[0])


@pytest.mark.parametrize("family", ("seq2seq", "classifier"))
def test_rdrop_passes_get_different_dropout_masks(family, tmp_path, monkeypatch):
    kls = []
    monkeypatch.setattr(regularisers, "symmetric_kl",
                        lambda *a, f=regularisers.symmetric_kl: kls.append(f(*a)) or kls[-1])
    m = model(family, tmp_path, dropout=0.3, rdrop=1.0)
    outs = []
    m.encoder.drop.register_forward_hook(lambda mod, args, out: outs.append((args[0], out)))
    b = batch(family)
    m.loss(b)
    x, out = outs[0]
    rows = len(next(iter(b.values())))
    assert x.shape[0] == 2 * rows and torch.equal(x[:rows], x[rows:])  # the batch twice, one pass
    first, second = (out == 0)[:rows], (out == 0)[rows:]
    assert first.any() and not torch.equal(first, second)  # independent masks
    assert float(kls[0].detach()) > 0


def test_rdrop_with_a_segment_memory_is_refused():
    recipe = validate({"family": "lm", "data": {"train": "x"}, "train": {"rdrop": 1.0},
                       "model": {"d_model": 16, "n_heads": 2, "n_layers": 1, "context": 16,
                                 "position": {"kind": "rope"}, "memory": {"kind": "xl"}}})
    with pytest.raises(UsageError, match=r"train.rdrop: .*model.memory.kind = 'xl'"):
        build_model(recipe, vocab_size=V)


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line and '"valid"' not in line]


def test_tfx_train_with_rdrop_for_translation_and_classification(tmp_path):
    g = torch.Generator().manual_seed(0)
    words = "the a cat dog sees runs big small house tree red blue".split()
    lines = [" ".join(words[i] for i in torch.randint(0, 12, (5,), generator=g)) for _ in range(40)]
    (tmp_path / "p.src").write_text("".join(line.upper() + "\n" for line in lines))
    (tmp_path / "p.tgt").write_text("".join(line + "\n" for line in lines))
    rows = "".join(f"{line}\t{'ab'[i % 2]}\n" for i, line in enumerate(lines))
    (tmp_path / "c.tsv").write_text("text\tlabel\n" + rows)
    common = ('[model]\nd_model = 16\nn_heads = 2\nd_ff = 32\ncontext = 40\ndropout = 0.1\n'
              'n_layers = 1\nencoder_layers = 1\ndecoder_layers = 1\n'
              '[train]\nsteps = 3\nbatch_size = 8\neval_every = 0\nsave_every = 0\nlog_every = 1\nthreads = 1\n')
    for name, data in (("mt", f'family = "seq2seq"\n[data]\ntrain = "{tmp_path / "p"}"\n'),
                       ("clf", f'family = "classifier"\n[data]\ntrain = "{tmp_path / "c.tsv"}"\n')):
        (tmp_path / f"{name}.toml").write_text(data + common + "word_dropout = 0.1\n")
        args = ("train", str(tmp_path / f"{name}.toml"), "--out")
        run_tfx(*args, str(tmp_path / f"{name}-rdrop"), "--set", "train.rdrop=1.0", check=True)
        assert tfx_in_process(*args, str(tmp_path / f"{name}-plain")).returncode == 0  # the same, rdrop = 0
        plain, rdrop = losses(tmp_path / f"{name}-plain"), losses(tmp_path / f"{name}-rdrop")
        assert len(rdrop) == len(plain) == 3 and all(math.isfinite(x) for x in rdrop)
        assert all(abs(a - b) > 1e-6 for a, b in zip(rdrop, plain)), (name, rdrop, plain)
