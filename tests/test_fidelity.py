"""The fidelity study's pieces: variants, boundary-only projection, stage embeddings, the report math."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from pmnode.bench.fidelity import RunResult, compare, loss_at, steps_to
from pmnode.bench.variants import parse_variant, slug, variant_config
from pmnode.cli import app
from pmnode.config import RunConfig
from pmnode.core.optim import build_optimizer
from pmnode.core.stages import Stage, build_subspace
from pmnode.core.train import Pipeline
from pmnode.core.worker import StageWorker
from pmnode.errors import ConfigError

D, K, V, T = 64, 8, 256, 16


def cfg(n_stages: int = 4, **sub) -> RunConfig:
    """The paper's preset, so each test adds the one mechanism it studies to the paper's constraint."""
    return RunConfig.model_validate(
        {
            "model": {"d_model": D, "n_layers": 4, "n_heads": 4, "vocab_size": V, "max_seq_len": 32},
            "subspace": {"preset": "paper", "compression_rank": K, "uncompressed_tail_layers": 1, **sub},
            "n_stages": n_stages,
            "train": {"seq_len": T, "batch_size": 4, "steps": 10},
            "optim": {"warmup_steps": 0},
        }
    )


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (4, T), generator=g), torch.randint(0, V, (4, T), generator=g)


def test_variant_overrides_and_unconstrained_rank() -> None:
    codec, over = parse_variant("subspace@4+model.d_model=32+subspace.constrain=boundaries+optim.lr=1e-3")
    assert codec == "subspace@4"
    assert over == {"model": {"d_model": 32}, "subspace": {"constrain": "boundaries"}, "optim": {"lr": 1e-3}}
    run, c = variant_config(cfg(), "subspace@d+model.d_model=32")
    assert (c, run.rank, run.model.d_model) == ("subspace", 32, 32)
    run, c = variant_config(cfg(), "dense")
    assert (c, run.subspace.enabled) == ("dense", False)
    assert slug("subspace@4+n_stages=2") == "subspace_4+n_stages_2"
    with pytest.raises(ConfigError):
        variant_config(cfg(), "subspace@4+subspace.constrain=everywhere")
    with pytest.raises(ConfigError):
        parse_variant("subspace@4+oops")


def test_boundaries_mode_projects_only_where_a_stage_ends() -> None:
    """Layers write at full width; the stream crossing a boundary is F[tok] + U U^T (x - F[tok])."""
    c = cfg(2, constrain="boundaries")
    sub = build_subspace(c)
    head, tail = Stage(c, 0, sub), Stage(c, 1, sub)
    assert all(w.mode == "free" for w in head.writes())
    tok, tgt = batch()
    x = head(None, tok)
    assert sub.residual_error(x, tok).item() > 0.5  # inside a stage the stream has its full width
    w = StageWorker(c, 0, "subspace", subspace=sub)
    w.stage.load_state_dict(head.state_dict())
    packet = w.forward("m", tokens=tok, samples=4)
    rebuilt = w.codec.lift(w.codec.unpack_activation(packet), tok)
    r = x - sub.table[tok]
    expected = sub.table[tok] + (r @ sub.basis) @ sub.basis.T
    assert torch.allclose(rebuilt, expected, atol=1e-5)
    assert sub.residual_error(rebuilt, tok).item() < 1e-5
    # The single-process trainer computes the same function: loss through the projected boundary.
    loss = F.cross_entropy(tail(expected, tok).flatten(0, 1), tgt.flatten())
    pipe = Pipeline(c, "subspace")
    pipe.workers[0].stage.load_state_dict(head.state_dict())
    pipe.workers[1].stage.load_state_dict(tail.state_dict())
    assert abs(pipe.eval_loss([(tok, tgt)]) - loss.item()) < 1e-5


def test_full_rank_basis_makes_both_modes_the_same_model() -> None:
    """At k = d nothing is projected away: layers and boundaries start from one function."""
    tok, tgt = batch(1)
    losses = []
    for mode in ("layers", "boundaries"):
        c = cfg(4, constrain=mode, compression_rank=D)
        losses.append(Pipeline(c, "subspace").eval_loss([(tok, tgt)]))
    assert abs(losses[0] - losses[1]) < 1e-4


@pytest.mark.parametrize("mode", ["layers", "boundaries"])
def test_stage_embeddings_start_at_zero_and_learn(mode: str) -> None:
    base, with_emb = cfg(4, constrain=mode), cfg(4, constrain=mode, stage_embeddings=True)
    tok, tgt = batch(2)
    assert abs(Pipeline(base).eval_loss([(tok, tgt)]) - Pipeline(with_emb).eval_loss([(tok, tgt)])) < 1e-6
    pipe = Pipeline(with_emb)
    cols = K if mode == "layers" else D
    assert [w.stage.reembed is None for w in pipe.workers] == [True, False, False, False]
    assert pipe.workers[1].stage.reembed.weight.shape == (V, cols)
    pipe.train_step(tok, tgt, 10)
    assert pipe.workers[2].stage.reembed.weight.abs().max().item() > 0  # it trained
    if mode == "layers":  # in span(U) like every other write: the stream stays F[tok] + span(U)
        sub = pipe.workers[0].stage.subspace
        x = None
        with torch.no_grad():
            for w in pipe.workers[:-1]:
                x = w.stage(x, tok)
                assert sub.residual_error(x, tok).item() < 1e-4


def test_write_lr_scale_multiplies_the_reparam_writes_only() -> None:
    c = cfg(2).with_overrides(optim={"write_lr_scale": 4.0, "lr": 1e-3})
    w = StageWorker(c, 0, "subspace")
    opt = build_optimizer(w.stage, c.optim)
    scaled = {id(p) for g in opt.param_groups if g["lr_scale"] == 4.0 for p in g["params"]}
    writes = {id(x.weight) for x in w.stage.writes()}
    assert scaled == writes
    tok, _ = batch()
    w.forward("m", tokens=tok, samples=4)
    w.backward("m", w.codec.pack_gradient(torch.ones(4, T, K)))
    w.step(10)
    lrs = sorted({g["lr"] for g in w.optimizer.param_groups})
    assert lrs == pytest.approx([1e-3, 4e-3])


def test_steps_to_target_and_loss_at_interpolate() -> None:
    curve = [(100, 1000, 3.0), (200, 2000, 2.0), (300, 3000, 1.5)]
    assert steps_to(curve, 2.5) == pytest.approx(150.0)
    assert steps_to(curve, 1.5) == pytest.approx(300.0)
    assert steps_to(curve, 1.0) is None
    assert steps_to(curve, 4.0) == 100.0  # reached at the first evaluation
    assert loss_at(curve, 2500) == pytest.approx(1.75)
    assert loss_at(curve, 5000) is None


def _run(variant: str, codec: str, rank: int | None, curve: list[tuple[int, int, float]]) -> RunResult:
    return RunResult(
        variant=variant,
        codec=codec,
        d_model=128,
        rank=rank,
        constrain="layers" if rank else None,
        boundaries=7,
        bytes_per_token=4 * (rank or 128),
        bytes_per_token_backward=4 * (rank or 128),
        steps=curve[-1][0],
        tokens=curve[-1][1],
        tokens_per_s=1.0,
        heldout_loss=curve[-1][2],
        curve=curve,
        diagnostics=None,
        config_hash="x",
        command="pmnode bench convergence",
    )


def test_compare_against_the_unconstrained_model() -> None:
    base = _run("subspace@d", "subspace", 128, [(10, 100, 2.0), (20, 200, 1.5), (40, 400, 1.0)])
    k4 = _run("subspace@4", "subspace", 4, [(10, 100, 2.0), (20, 200, 1.8), (40, 400, 1.2)])
    dense = _run("dense", "dense", None, [(10, 100, 2.1), (20, 200, 1.6), (40, 400, 1.1)])
    rows = {r.variant: r for r in compare([base, k4, dense], None)}
    assert rows["subspace@4"].gap_end == pytest.approx(0.2)
    assert rows["subspace@4"].gap_mid == pytest.approx(0.2)  # 1.8 vs 1.5 at 200 tokens
    assert rows["subspace@4"].gap_dense == pytest.approx(1.2 / 1.1 - 1, abs=1e-4)
    assert rows["subspace@4"].steps_to_target is None  # never reached 1.0
    assert rows["subspace@d"].steps_ratio == 1.0
    # An explicit target: 1.5 is reached at step 20 by the baseline, at 20 + 20 * 0.3/0.6 by k=4.
    rows = {r.variant: r for r in compare([base, k4], 1.5)}
    assert rows["subspace@4"].steps_to_target == pytest.approx(30.0)
    assert rows["subspace@4"].steps_ratio == pytest.approx(1.5)


def test_bench_convergence_long_run_mode(tmp_path: Path, toy_corpus: Path) -> None:
    """The CLI trains each variant into OUT/runs/ and rebuilds the report from every run there."""
    out = tmp_path / "fid"
    common = ["bench", "convergence", "--config", "tiny", "--out", str(out), "--data", str(toy_corpus)]
    args = [*common, "--tokens", "3000", "--eval-points", "3", "--threads", "1"]
    r = CliRunner().invoke(app, [*args, "--codecs", "default,default@d"])  # tiny as shipped, its twin
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, [*args, "--codecs", "subspace@2+subspace.preset=paper"])
    assert r.exit_code == 0, r.output
    assert len(list((out / "runs").glob("*.json"))) == 3
    res = json.loads((out / "results.json").read_text())
    rows = {row["variant"]: row for row in res["rows"]}
    assert set(rows) == {"default", "default@d", "subspace@2+subspace.preset=paper"}
    assert rows["default"]["baseline"] == "default@d" and rows["default@d"]["gap_end"] == 0.0
    assert rows["default"]["tokens"] == 3072  # 6 steps of 8 x 64 tokens
    assert rows["default"]["bytes_per_token"] == 8 + 2 + 1  # int8 k = 8, its scale, the token id
    run = res["runs"][0]
    assert len(run["curve"]) == 3 and len(run["diagnostics"]["layers"]) == 4
    assert (out / "loss.png").stat().st_size > 0
    report = (out / "results.md").read_text()
    assert "(int8 k=d/8, remedy)" in report and "(fp32 k=d (twin), remedy)" in report
    bad = CliRunner().invoke(app, [*args, "--codecs", "subspace@2+nonsense.key=1"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output


def test_stage_bigrams_hash_pairs_within_the_window() -> None:
    from pmnode.core.model import bigram_ids

    tok = torch.tensor([[1, 2, 3], [5, 2, 3]])
    ids = bigram_ids(tok, V, 4096)
    assert ids[0, 2] == ids[1, 2]  # the same pair (2, 3), wherever it is
    assert ids[0, 1] != ids[1, 1]  # (1, 2) vs (5, 2)
    assert ids[0, 0] == (V * 1_000_003 + 1) % 4096  # position 0 pairs with the start marker
    c = cfg(4, constrain="boundaries", stage_embeddings=True, stage_bigrams=512)
    pipe = Pipeline(c)
    assert pipe.workers[1].stage.bigrams.weight.shape == (512, D)
    tok, tgt = batch(3)
    before = Pipeline(cfg(4, constrain="boundaries")).eval_loss([(tok, tgt)])
    assert abs(pipe.eval_loss([(tok, tgt)]) - before) < 1e-6  # zero at init
    pipe.train_step(tok, tgt, 10)
    assert pipe.workers[3].stage.bigrams.weight.abs().max().item() > 0


def test_stage_ngrams_hash_the_last_n_tokens() -> None:
    from pmnode.core.model import ngram_ids
    from pmnode.core.sizing import stage_sizes

    tok = torch.tensor([[1, 2, 3, 4], [9, 2, 3, 4], [9, 7, 3, 4]])
    tri = ngram_ids(tok, V, 4096, 3)
    assert tri[0, 3] == tri[1, 3]  # the same (2, 3, 4)
    assert tri[1, 3] != tri[2, 3]  # (7, 3, 4)
    assert tri[0, 2] != tri[1, 2]  # (1, 2, 3) vs (9, 2, 3)
    assert tri[0, 0] == ((V * 1_000_003 + V) % (2**31 - 1) * 1_000_003 + 1) % 4096  # two start markers
    big = torch.tensor([[131_071, 131_070, 131_069, 131_068]])  # a 128K vocabulary: no int64 overflow
    assert int(ngram_ids(big, 131_072, 1 << 20, 4).min()) >= 0
    c = cfg(4, constrain="boundaries", stage_embeddings=True, stage_bigrams=256, stage_ngrams=4)
    pipe = Pipeline(c)
    tables = pipe.workers[2].stage.ngrams
    assert [t.weight.shape for t in tables] == [(256, D), (256, D)]
    tok, tgt = batch(3)
    before = Pipeline(cfg(4, constrain="boundaries")).eval_loss([(tok, tgt)])
    assert abs(pipe.eval_loss([(tok, tgt)]) - before) < 1e-6  # zero at init
    pipe.train_step(tok, tgt, 10)
    assert all(t.weight.abs().max().item() > 0 for t in pipe.workers[3].stage.ngrams)
    pairs_only = cfg(4, constrain="boundaries", stage_embeddings=True, stage_bigrams=256)
    extra = stage_sizes(c)[1].params_trainable - stage_sizes(pairs_only)[1].params_trainable
    assert extra == 2 * 256 * D  # two more tables of the same rows, full width in boundaries mode


def test_each_variant_is_compared_with_the_unconstrained_model_of_its_architecture() -> None:
    from pmnode.bench.fidelity import architecture

    assert architecture("subspace@4+n_stages=2+subspace.constrain=boundaries") == ""
    feat = "subspace.stage_bigrams=64,subspace.stage_embeddings=True"
    assert architecture("subspace@4+subspace.stage_embeddings=true+subspace.stage_bigrams=64") == feat
    assert architecture("subspace@d+subspace.stage_embeddings=true+subspace.stage_bigrams=64") == feat
    assert architecture("subspace@4+subspace.stage_embeddings=true", plain=True) == ""
    curve = [(10, 100, 2.0), (20, 200, 1.0)]
    plain = _run("subspace@d", "subspace", 128, curve)
    rich = _run(
        "subspace@d+subspace.stage_embeddings=true", "subspace", 128, [(10, 100, 1.8), (20, 200, 0.9)]
    )
    k4 = _run("subspace@4+subspace.stage_embeddings=true", "subspace", 4, [(10, 100, 1.9), (20, 200, 0.99)])
    rows = {r.variant: r for r in compare([rich, plain, k4], None)}
    assert rows[k4.variant].baseline == rich.variant
    assert rows[k4.variant].gap_end == pytest.approx(0.1)
    assert rows[k4.variant].gap_plain == pytest.approx(-0.01)
    # `default` is the shipped config: its twin default@d is its baseline, not its plain model.
    shipped = _run("default", "subspace", 4, [(10, 100, 1.9), (20, 200, 0.95)])
    twin = _run("default@d", "subspace", 128, [(10, 100, 1.8), (20, 200, 0.9)])
    rows = {r.variant: r for r in compare([shipped, twin], None)}
    assert rows["default"].baseline == "default@d"
    assert rows["default"].gap_end == pytest.approx(0.95 / 0.9 - 1, abs=1e-4)
    assert rows["default"].gap_plain is None  # no plain run: '-', not the twin again
    rows = {r.variant: r for r in compare([shipped, twin, plain], None)}
    assert rows["default"].gap_plain == pytest.approx(-0.05)


def test_sweeps_take_plain_compressed_runs_at_fixed_tokens() -> None:
    from pmnode.bench.fidelity_sweeps import END, MID, points

    mark = [(1, 1_000_000, 2.0), (2, MID, 1.5), (4, END, 1.0)]
    base = _run("subspace@d", "subspace", 128, mark)
    k4 = _run("subspace@4", "subspace", 4, [(1, 1_000_000, 2.2), (2, MID, 1.8), (4, END, 1.1)])
    int8 = _run("subspace:int8@16", "subspace:int8", 16, [(1, 1_000_000, 2.0), (2, MID, 1.65)])
    int8.complete = False  # cut at 2.5M: no end gap, no steps ratio
    remedy = _run("subspace@4+subspace.stage_embeddings=true", "subspace", 4, mark)  # not plain
    pts = {p.variant: p for p in points(compare([base, k4, int8, remedy], None), [base, k4, int8, remedy])}
    assert set(pts) == {"subspace@4", "subspace:int8@16"}
    assert pts["subspace@4"].gaps == {1_000_000: 0.1, MID: 0.2, END: 0.1}
    assert pts["subspace@4"].steps_ratio is None  # ended at 1.1, above the baseline's 1.0
    assert pts["subspace:int8@16"].precision == "int8"
    assert pts["subspace:int8@16"].gaps == {1_000_000: 0.0, MID: 0.1, END: None}
    assert pts["subspace:int8@16"].steps_ratio is None


def test_default_variants_and_their_names() -> None:
    from pmnode.bench.labels import label, preset_of, setting_of

    remedy = {"preset": "remedy", "compression_ratio": 8, "compression_rank": None}
    deep = cfg(4).with_overrides(subspace=remedy)
    run_cfg, codec = variant_config(deep, "default")
    assert (codec, run_cfg.rank, run_cfg.subspace.constrain) == ("subspace:int8", D // 8, "boundaries")
    twin, codec = variant_config(deep, "default@d+model.d_model=32")
    assert (codec, twin.rank, twin.subspace.stage_bigrams) == ("subspace", 32, 4096)  # fp32, k = d
    paper, codec = variant_config(deep, "default+subspace.preset=paper")
    assert (codec, paper.subspace.constrain, paper.subspace.stage_embeddings) == ("subspace", "layers", False)
    t = "+subspace.constrain=boundaries+subspace.stage_embeddings=true+subspace.stage_bigrams=4096"
    # Runs from before presets trained under the paper's; default* variants under the remedy.
    assert preset_of("subspace@4" + t, None) == "paper" and preset_of("default@d", None) == "remedy"
    assert setting_of("subspace:int8@16" + t + "+subspace.stage_ngrams=3", "paper") == "remedy"
    assert setting_of("default+model.d_model=128", "remedy") == "remedy"
    assert setting_of("subspace@4+n_stages=4" + t, "paper") == (
        "paper, constrain=boundaries, stage_embeddings=true, stage_bigrams=4096, n_stages=4"
    )
    assert label("subspace@4" + t, "subspace", 4, 128, "paper") == "fp32 k=d/32, full width+tok+pairs"
    assert label("default@d", "subspace", 128, 128, "remedy") == "fp32 k=d (twin), remedy"
