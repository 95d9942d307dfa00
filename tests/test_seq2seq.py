"""Encoder-decoder: padding masks, cache parity, greedy vs beam, exact beams on a hand-set model."""
from __future__ import annotations

import math

import pytest
import torch

from tfx.config import validate
from tfx.decoding.beam import beam_search, greedy
from tfx.families import build_model

PAD, BOS, EOS, A, B = 0, 1, 2, 3, 4


class MarkovModel:
    """A 'translation model' whose next-token probabilities depend only on the last token."""

    table = {BOS: {A: 0.6, B: 0.4}, A: {A: 0.4, B: 0.3, EOS: 0.3}, B: {EOS: 0.9, A: 0.05, B: 0.05}}

    class State:
        def reorder(self, index):
            pass

    def encode(self, src, mask):
        return torch.zeros(src.shape[0], src.shape[1], 1)

    def new_state(self, memory, mask, max_len):
        return self.State()

    def __call__(self, tokens, state):
        rows = []
        for t in tokens[:, -1].tolist():
            p = torch.full((5,), 1e-30, dtype=torch.float64)
            for tok, prob in self.table[t].items():
                p[tok] = prob
            rows.append(p.log())
        return torch.stack(rows)[:, None, :], state


def test_beam_search_exact_hypotheses_and_scores():
    src = torch.tensor([[A, EOS], [B, EOS]])
    mask = torch.ones_like(src, dtype=torch.bool)
    out = beam_search(MarkovModel(), src, mask, beam=2, bos=BOS, eos=EOS, max_len=[10, 10], len_penalty=1.0, nbest=2)
    for hyps in out:  # both sentences see the same model
        assert [h.tokens for h in hyps] == [[B], [A, B]]
        assert hyps[0].score == pytest.approx(math.log(0.4 * 0.9), abs=1e-9)
        assert hyps[1].score == pytest.approx(math.log(0.6 * 0.3 * 0.9), abs=1e-9)
        assert hyps[0].normalized == pytest.approx(math.log(0.36) / 2, abs=1e-9)
        assert hyps[1].normalized == pytest.approx(math.log(0.162) / 3, abs=1e-9)


def test_greedy_is_not_beam_here_and_max_length_forces_eos():
    src = torch.tensor([[A, EOS]])
    mask = torch.ones_like(src, dtype=torch.bool)
    (hyp,) = greedy(MarkovModel(), src, mask, bos=BOS, eos=EOS, max_len=[4])
    assert hyp.tokens == [A, A, A]
    assert hyp.score == pytest.approx(math.log(0.6 * 0.4 * 0.4 * 0.3), abs=1e-6)


def tiny_recipe(**model):
    return validate({"family": "seq2seq", "data": {"train": "x"}, "train": {"label_smoothing": 0.1},
                     "model": {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "context": 24, "encoder_layers": 2,
                               "decoder_layers": 2, "position": {"kind": "sinusoidal"}, **model}})


def tiny(**model):
    recipe = tiny_recipe(**model)
    torch.manual_seed(0)
    return build_model(recipe, vocab_size=13).double().eval()


def batch_of(rows):
    width = max(len(r) for r in rows)
    src = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    return src, src != PAD


SOURCES = [[5, 6, 7, EOS], [8, 9, EOS], [10, 11, 12, 5, 6, 7, EOS], [7, EOS]]


@pytest.mark.parametrize("position", ["sinusoidal", "rope", "alibi", "learned"])
def test_padding_changes_no_output_for_real_tokens(position):
    model = tiny(position={"kind": position})
    src = torch.tensor([[5, 6, 7, EOS]])
    padded = torch.tensor([[5, 6, 7, EOS, PAD, PAD]])
    mem = model.encode(src, src != PAD)
    mem_padded = model.encode(padded, padded != PAD)
    torch.testing.assert_close(mem_padded[:, :4], mem, rtol=1e-10, atol=1e-10)
    tgt, tgt_padded = torch.tensor([[BOS, 8, 9]]), torch.tensor([[BOS, 8, 9, PAD, PAD]])
    out, _ = model.decoder(tgt, source=mem, source_mask=src != PAD)
    out_padded, _ = model.decoder(tgt_padded, source=mem_padded, source_mask=padded != PAD)
    torch.testing.assert_close(out_padded[:, :3], out, rtol=1e-10, atol=1e-10)


def decoder_positions() -> list[str]:
    """Every position scheme in the registry that the recipe check accepts for this seq2seq model."""
    from tfx.config import import_kinds
    from tfx.errors import UsageError
    from tfx.registry import POSITION

    import_kinds()
    accepted = []
    for kind in POSITION.names():
        try:
            tiny_recipe(position={"kind": kind})
        except UsageError as exc:  # refused by tfx.kinds.problems
            assert "impossible combination" in str(exc)
            continue
        accepted.append(kind)
    return accepted


def test_the_decoder_accepts_every_position_scheme_with_dense_attention():
    from tfx.registry import POSITION

    text = [p for p in POSITION.names() if not POSITION.get(p).images_only]  # 2-D ones are for images
    assert decoder_positions() == text  # so the parity test below covers them all


@pytest.mark.parametrize("position", decoder_positions())
def test_decoder_cache_parity_and_cross_kv_computed_once(position):
    model = tiny(position={"kind": position})
    src, mask = batch_of(SOURCES)
    tgt = torch.randint(3, 13, (4, 9), generator=torch.Generator().manual_seed(0))
    mem = model.encode(src, mask)
    full, _ = model.decoder(tgt, source=mem, source_mask=mask)
    state = model.new_state(mem, mask, 16)
    cross = state.cross
    steps = [model.decoder(tgt[:, :3], state=state)[0]]
    for t in range(3, 9):
        steps.append(model.decoder(tgt[:, t:t + 1], state=state)[0])
    assert state.cross is cross  # the projected source keys/values were reused, not recomputed
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)


def test_beam_one_equals_greedy_and_batch_equals_one_at_a_time():
    model = tiny()
    src, mask = batch_of(SOURCES)
    limits = [12] * len(SOURCES)
    g = greedy(model, src, mask, bos=BOS, eos=EOS, max_len=limits)
    b1 = beam_search(model, src, mask, beam=1, bos=BOS, eos=EOS, max_len=limits)
    assert [h.tokens for h in g] == [hs[0].tokens for hs in b1]
    for a, (bh,) in zip(g, b1):
        assert a.score == pytest.approx(bh.score, abs=1e-9)
    batched = beam_search(model, src, mask, beam=3, bos=BOS, eos=EOS, max_len=limits, nbest=3)
    for row, hyps in zip(SOURCES, batched):
        s, m = batch_of([row])
        (alone,) = beam_search(model, s, m, beam=3, bos=BOS, eos=EOS, max_len=[12], nbest=3)
        assert [h.tokens for h in hyps] == [h.tokens for h in alone]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in alone], abs=1e-9)


def test_label_smoothing_only_in_training():
    """Training loss = (1 - e) * NLL + e * mean over the vocabulary of -log p; eval loss = NLL."""
    model = tiny()
    src, mask = batch_of(SOURCES)
    tgt = torch.randint(3, 13, (4, 5), generator=torch.Generator().manual_seed(1))
    batch = {"src": src, "src_mask": mask, "tgt_in": tgt[:, :-1], "tgt_out": tgt[:, 1:]}
    with torch.no_grad():
        logp = model(tgt[:, :-1], model.new_state(model.encode(src, mask), mask, 16))[0].log_softmax(-1)
    nll = -logp.gather(-1, tgt[:, 1:, None]).sum()
    uniform = -logp.mean(-1).sum()
    assert float(model.loss(batch)[0].detach()) == pytest.approx(float(nll), rel=1e-6)
    model.train()
    assert float(model.loss(batch)[0].detach()) == pytest.approx(float(0.9 * nll + 0.1 * uniform), rel=1e-6)


def test_separate_source_tokenizer(tmp_path):
    """src_tokenizer: the encoder gets its own vocabulary; train, translate and resume-load all use it."""
    from tfx import run

    pairs = [(f"ein haus {i}", f"a house {i}") for i in range(40)]
    (tmp_path / "pairs.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in pairs))
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'''
family = "seq2seq"
[data]
train = "{tmp_path / 'pairs.tsv'}"
[tokenizer]
kind = "byte"
[src_tokenizer]
kind = "char"
[model]
d_model = 16
n_heads = 2
n_layers = 1
context = 32
[train]
steps = 2
batch_size = 8
device = "cpu"
''')
    out = tmp_path / "run"
    run.train(str(recipe), overrides=[], out=str(out), resume=None)
    assert (out / "tokenizer-src/tokenizer.json").is_file()
    _, tok, model = run.load_run(out)
    assert model.decoder.embed.num_embeddings == tok.vocab_size == 260
    assert model.encoder.embed.num_embeddings == 4 + len(set("".join(a for a, _ in pairs)))
    assert model.encoder.embed is not model.decoder.embed and model.head.weight is model.decoder.embed.weight
    (line, text), = run.generate_lines(str(out), ["ein haus 7"], max_new_tokens=3)
    assert line == "ein haus 7" and isinstance(text, str)
