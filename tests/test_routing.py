"""Router scoring, EM routers and the baselines, on tiny models (partition: test_partition.py)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from smalltalk.config import ModelConfig
from smalltalk.data.shards import SplitData
from smalltalk.llama import build_model, resolve_spec
from smalltalk.routing import scoring
from smalltalk.routing.routers import LMRouters, load_routers
from smalltalk.routing.scoring import score_batches

from .conftest import ROUTING, TINY_CONFIG, cli, hf_prefix_loglik, partition_with, router_model_dirs


@pytest.mark.parametrize("workers", [1, 2])
def test_scoring_equals_per_sequence_reference(prepared_run, monkeypatch, workers):
    spec = resolve_spec(ModelConfig(preset="test-tiny"), 384)
    models = [build_model(spec, 64, seed=s) for s in (1, 2, 3)]
    data = SplitData(prepared_run / "data", "train")
    ids = np.arange(13)
    # 64-row LM-head blocks: 5 x 19 scored positions span two blocks, one of them partial
    monkeypatch.setitem(scoring.HEAD_BLOCK_LOGITS, "cpu", 64 * 384 // torch.get_num_threads())
    threads = torch.get_num_threads()
    scores = score_batches(models, lambda rows: data.batch(rows, 20), ids, batch_size=5, workers=workers)
    assert torch.get_num_threads() == threads  # the workers' thread setting is undone
    assert scores.shape == (13, 3) and scores.dtype == np.float32
    for i in ids:
        x = torch.from_numpy(data.batch(np.array([i]), 20))
        for e, model in enumerate(models):
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)
            reference = logp.gather(1, x[0, 1:, None]).sum().item()  # the first token is not scored
            assert scores[i, e] == pytest.approx(reference, rel=1e-5, abs=1e-4)


def test_em_history_and_checkpoints(em_run):
    history = json.loads((em_run / "em_history.json").read_text())["rounds"]
    assert [r["round"] for r in history] == [0, 1, 2]
    for row in history:
        assert row["loads"] == [80, 80, 80]
        for key in ("train_loss", "share_loss", "heldout_loss"):
            assert len(row[key]) == 3 and all(np.isfinite(row[key]))
        assert 0 <= row["share_nmi"] <= 1 and 0 <= row["heldout_purity"] <= 1
    assert history[0]["best_changed_fraction"] is None and 0 <= history[1]["best_changed_fraction"] <= 1
    assert history[0]["share_nmi"] < 0.2  # round 0 is a random split
    # Specialisation grows from the random split (a random split scores ~0.01 here).
    assert history[-1]["share_nmi"] > history[0]["share_nmi"] + 0.1
    assert history[-1]["heldout_nmi"] > 0.2
    manifest = json.loads((em_run / "manifest.json").read_text())
    assert manifest["method"] == "em" and manifest["routers"] == ["00", "01", "02"]
    # one optimizer per router carried across rounds: the router's step counter accumulates
    state = torch.load(sorted((em_run / "01" / "checkpoints").iterdir())[-1] / "trainer_state.pt",
                       weights_only=False)
    assert state["step"] == 90 and len(state["optimizer"]["state"]) > 0
    # prefix-only training
    assert state["config"]["seq_len"] == 16


def test_em_routers_see_each_sequence_once_per_epoch(em_run):
    shares = [np.load(p)["ids"] for p in sorted((em_run / "shares").glob("round_*.npz"))]
    seen = np.concatenate(shares)
    assert len(np.unique(seen)) == len(seen), "fresh chunks must not reuse sequences"


def test_baselines_partition_balanced(prepared_run, tmp_path):
    for method in ("tfidf", "random"):
        out = tmp_path / method
        assert cli("routers", "train", *ROUTING, "--run", prepared_run, "--method", method, "--out", out) == 0
        manifest = partition_with(prepared_run, out, tmp_path / f"part-{method}")
        assert max(manifest["counts"]) - min(manifest["counts"]) <= 1
        router = load_routers(out)
        tokens = SplitData(prepared_run / "data", "test").batch(np.arange(10), 16)
        scores = router.score(tokens)
        assert scores.shape == (10, 3) and np.array_equal(scores, router.score(tokens))  # deterministic
        if method == "random":
            assert manifest["quality"]["nmi"] < 0.1
        else:
            assert manifest["quality"]["nmi"] > 0.3


def test_em_resumes_at_round_boundary(prepared_run, em_run, tmp_path):
    """Cut the history back to round 1 and rerun: the last round is redone and gives the same routers."""
    import shutil

    copy = tmp_path / "routers"
    shutil.copytree(em_run, copy)
    history = json.loads((copy / "em_history.json").read_text())
    history["rounds"] = history["rounds"][:2]
    (copy / "em_history.json").write_text(json.dumps(history))
    for router in ("00", "01", "02"):  # drop the last round's checkpoint and model
        ckpts = sorted((copy / router / "checkpoints").iterdir())
        shutil.rmtree(ckpts[-1])
        shutil.rmtree(copy / router / "model")
    assert cli("routers", "train", *ROUTING, "--run", prepared_run, "--out", copy) == 0
    from safetensors.torch import load_file

    for router in ("00", "01", "02"):
        a = load_file(str(em_run / router / "model" / "model.safetensors"))
        b = load_file(str(copy / router / "model" / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_em_refuses_a_directory_with_other_settings(prepared_run, em_run, capsys):
    assert cli("routers", "train", *ROUTING, "--run", prepared_run, "--out", em_run, "--prefix", "8") == 2
    assert "other settings" in capsys.readouterr().err


def test_bf16_router_scoring_runs_under_autocast(prepared_run):
    """routing.train.dtype=bfloat16 scores under bf16 autocast (as on GPU): close to fp32, not equal."""
    spec = resolve_spec(ModelConfig(preset="test-tiny"), 384)
    models = [build_model(spec, 64, seed=s) for s in (1, 2)]
    tokens = SplitData(prepared_run / "data", "train").batch(np.arange(12), 16)
    fp32 = LMRouters(models, batch_size=5).score(tokens)
    bf16 = LMRouters(models, batch_size=5, dtype="bfloat16").score(tokens)
    assert bf16.dtype == np.float32 and not np.array_equal(fp32, bf16)
    assert np.allclose(fp32, bf16, rtol=0.02, atol=0.5)


def test_lm_routers_score_api(em_run, prepared_run):
    """`score` of loaded EM routers: [N, E] float32 prefix log-likelihoods equal to each router's own HF
    log-softmax, by the grouped forward (a short batch) and by the per-router loop (a long one)."""
    router = load_routers(em_run)
    assert isinstance(router, LMRouters) and router.num_experts == 3
    data = SplitData(prepared_run / "data", "validation")
    tokens = data.batch(np.arange(min(len(data), 40)), 16)
    reference = hf_prefix_loglik(router_model_dirs(em_run), tokens)
    short = router.score(tokens[:4])  # 64 prefix tokens: the grouped forward
    assert short.dtype == np.float32 and short.shape == (4, 3)
    assert np.allclose(short, reference[:4], rtol=1e-5, atol=1e-4)
    long = router.score(tokens)  # over GROUPED_CPU_TOKENS: the per-router loop
    assert len(tokens) * 16 > LMRouters.GROUPED_CPU_TOKENS and np.allclose(long, reference, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_compiled_router_scoring_matches_eager(prepared_run):
    spec = resolve_spec(ModelConfig(preset="test-tiny"), 384)
    models = [build_model(spec, 64, seed=s) for s in (1, 2)]
    tokens = SplitData(prepared_run / "data", "train").batch(np.arange(12), 16)
    eager = LMRouters(models, batch_size=5).score(tokens)
    compiled = LMRouters(models, batch_size=5, compile=True).score(tokens)
    assert np.allclose(eager, compiled, rtol=1e-4, atol=1e-3)



def test_oracle_groups_balance_domains_largest_first():
    from smalltalk.routing.baselines import oracle_groups

    counts = {"a": 50, "b": 40, "c": 30, "d": 20, "e": 10, "f": 10}
    assert oracle_groups(counts, 2) == [["a", "d", "e"], ["b", "c", "f"]]  # 80 vs 80
    assert oracle_groups(counts, 3) == [["a", "f"], ["b", "e"], ["c", "d"]]  # 60, 50, 50
    assert oracle_groups({"x": 5}, 2) == [["x"], []]


def test_similar_groups_put_related_domains_together_within_the_cap():
    """Four domains, two pairs of related ones: balanced grouping mixes the pairs (sizes decide), similarity
    grouping keeps each pair together; a merge that would pass 1.5x an expert's share is refused."""
    from smalltalk.routing.baselines import oracle_groups, similar_groups

    counts = {"code_c": 40, "prose_en": 35, "code_py": 30, "prose_de": 25}
    centroids = np.array([[1.0, 0.1], [0.1, 1.0], [0.9, 0.2], [0.2, 0.9]])
    assert oracle_groups(counts, 2) == [["code_c", "prose_de"], ["prose_en", "code_py"]]
    assert similar_groups(centroids, counts, 2) == [["code_c", "code_py"], ["prose_de", "prose_en"]]
    big = {"code_c": 90, "prose_en": 10, "code_py": 90, "prose_de": 10}  # code_c + code_py = 180 > 1.5 x 100
    grouped = similar_groups(centroids, big, 2)
    assert sorted(map(sorted, grouped)) == [["code_c"], ["code_py", "prose_de", "prose_en"]]  # the prose pair first


def test_similar_oracle_groups_the_labelled_domains_by_tfidf_centroids(prepared_run, tmp_path):
    """`routing.oracle_grouping: similar` through `routers train`: every domain in one of E non-empty groups,
    the grouping named in the manifest, the same groups on a rerun."""
    outs = [tmp_path / name for name in ("a", "b")]
    for out in outs:
        assert cli("routers", "train", "--config", TINY_CONFIG, "--run", prepared_run, "--out", out,
                   "--set", "routing.method=oracle", "--set", "routing.oracle_grouping=similar",
                   "--set", "routing.experts=2") == 0
    a, b = (json.loads((out / "manifest.json").read_text()) for out in outs)
    assert a["grouping"] == "similar" and a["groups"] == b["groups"] and len(a["groups"]) == 2
    assert sorted(d for g in a["groups"] for d in g) == sorted(SplitData(prepared_run / "data", "train").domain_names)
    assert all(a["groups"])


@pytest.mark.slow
def test_oracle_mixture_routes_by_label(corpus_file, tmp_path, capsys):
    """routing.method=oracle through the whole pipeline: the partition is the domain grouping, eval routes
    by label, and a prompt (which has no label) is refused with a clear error."""
    run = tmp_path / "oracle"
    assert cli("run", "--config", TINY_CONFIG, "--run", run, "--set", f"data.inputs=[{corpus_file}]",
               "--set", "data.max_docs=null", "--set", "routing.experts=3", "--set", "routing.method=oracle",
               "--set", "dense.bigger=false") == 0
    partition = json.loads((run / "partition" / "manifest.json").read_text())
    assert partition["quality"]["purity"] > 0.95 and partition["quality"]["nmi"] > 0.9
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["method"] == "oracle" and results["timing"] is None
    assert all(len(row["experts_used"]) == 1 for row in results["per_domain"])  # one expert per domain
    capsys.readouterr()
    assert cli("generate", "--run", run, "xyz_ {} = 1", "--max-new-tokens", "2") == 2
    assert "domain label" in capsys.readouterr().err


def test_tfidf_router_from_arrays_equals_sklearn():
    """The stored arrays reproduce TfidfVectorizer(sublinear_tf) + TruncatedSVD + L2 exactly."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    from smalltalk.routing.routers import TfidfRouter

    from .conftest import make_documents

    texts = [d["text"][:300] for d in make_documents(60, seed=4)]
    vectorizer = TfidfVectorizer(sublinear_tf=True, max_features=100_000)
    svd = TruncatedSVD(n_components=8, random_state=0).fit(vectorizer.fit_transform(texts))
    router = TfidfRouter(lambda row: texts[int(row[0])], vectorizer.vocabulary_, vectorizer.idf_, svd.components_,
                         np.zeros((3, 8), np.float32))
    expected = normalize(svd.transform(vectorizer.transform(texts))).astype(np.float32)
    assert np.allclose(router.embed(np.arange(len(texts))[:, None]), expected, atol=1e-6)


def test_a_pickle_in_a_run_directory_is_never_loaded(tmp_path):
    import pickle

    from smalltalk.errors import SmalltalkError

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    routers = tmp_path / "routers"
    routers.mkdir()
    (routers / "manifest.json").write_text(json.dumps({"method": "tfidf", "experts": 2, "prefix": 8}))
    (routers / "tfidf.pkl").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(SmalltalkError, match="pickle"):
        load_routers(routers)
    assert not (tmp_path / "pwned").exists()


def test_em_levers_warm_start_distinct_init_and_share_passes(prepared_run, tmp_path):
    """routing.init_split=tfidf starts EM from the tf-idf clustering (round 0 already follows the domains,
    where a random split does not); router_init=distinct seeds router e with seed + e; share_passes sets
    the M-step length from the share size."""
    out = tmp_path / "routers"
    levers = ["--set", "routing.init_split=tfidf", "--set", "routing.router_init=distinct",
              "--set", "routing.share_passes=2", "--set", "routing.rounds=2"]
    assert cli("routers", "train", *ROUTING, *levers, "--run", prepared_run, "--out", out) == 0
    history = json.loads((out / "em_history.json").read_text())["rounds"]
    assert history[0]["share_nmi"] > 0.3  # a random round 0 scores < 0.2 (test_em_history_and_checkpoints)
    assert (out / "warm-start" / "tfidf.npz").is_file()
    seeds, steps = [], set()
    for name in ("00", "01", "02"):
        state = torch.load(sorted((out / name / "checkpoints").iterdir())[-1] / "trainer_state.pt",
                           weights_only=False)
        seeds.append(state["config"]["seed"])
        steps.add(state["step"])
    assert seeds == [seeds[0], seeds[0] + 1, seeds[0] + 2]
    assert steps == {2 * 20}  # 2 passes over 240 / 3 = 80 sequences at batch 8: 20 steps per round


def test_new_routing_levers_keep_old_digests():
    """A run made before the EM levers existed resumes: at their old behaviour they are not in the digest."""
    from smalltalk.config import load_config
    from smalltalk.run.pipeline import STAGES, digest, stage_config

    routers = next(s for s in STAGES if s.name == "routers")
    cfg = load_config(TINY_CONFIG)
    assert "router_init" not in stage_config(cfg, routers)["routing"]
    base = digest(cfg, routers)
    cfg.routing.router_init = "distinct"
    assert digest(cfg, routers) != base
    cfg.routing.router_init = "shared"
    assert digest(cfg, routers) == base


@pytest.mark.parametrize("preset", ["test-tiny", "cpu-router-0.1m"])
def test_grouped_scoring_equals_the_per_router_loop(prepared_run, preset):
    """routing/grouped.py (stacked weights, one batched forward) gives each router's own scores, in
    router order, for a served prompt (batch 1) and a partition batch; GQA routers too."""
    from smalltalk.routing.grouped import GroupedRouters

    spec = resolve_spec(ModelConfig(preset=preset), 384)
    models = [build_model(spec, 64, seed=s).eval() for s in (1, 2, 3)]
    data = SplitData(prepared_run / "data", "train")
    for rows, length in ((1, 16), (7, 32)):
        tokens = data.batch(np.arange(rows), length)
        loop = LMRouters(models, batch_size=4, grouped=False).score(tokens)
        grouped = GroupedRouters(models).prefix_loglik(torch.from_numpy(tokens.astype(np.int64))).numpy()
        assert np.allclose(grouped, loop, rtol=1e-5, atol=1e-4)
    gqa = dataclasses.replace(spec, num_heads=4, num_kv_heads=2) if spec.num_heads % 2 == 0 else spec
    models = [build_model(gqa, 64, seed=s).eval() for s in (1, 2)]
    tokens = data.batch(np.arange(3), 16)
    assert np.allclose(GroupedRouters(models).prefix_loglik(torch.from_numpy(tokens.astype(np.int64))).numpy(),
                       LMRouters(models, grouped=False).score(tokens), rtol=1e-5, atol=1e-4)
    # LMRouters takes the grouped path for a small batch on CPU
    router = LMRouters(models)
    assert router.grouped is not None and tokens.size <= router.GROUPED_CPU_TOKENS
    assert np.allclose(router.score(tokens), LMRouters(models, grouped=False).score(tokens), rtol=1e-5, atol=1e-4)
