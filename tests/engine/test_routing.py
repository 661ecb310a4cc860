"""Layer routing (data-flow merges): routes of layers from several models run
in memory on shared layers, generate with a KV cache, export to plain
Hugging Face folders (and to mergekit passthrough recipes) with the same
logits, combine with a parameter-space merge (hybrids), and refuse bad input.

Every check runs on a Llama-style family (untied embeddings, grouped-query
attention) and a Qwen2-style one (attention biases, tied embeddings).

Initialisation: the scale fold is exact up to the RMSNorm epsilon. With
transformers' default init (initializer_range 0.02) a tiny random model's
hidden states have an RMS of about 0.02, where eps = 1e-6 alone moves the
logits by ~1e-4 once a stream is rescaled; real models' activations are far
larger. The exactness tests therefore use initializer_range 0.2 (realistic
activation size), and ``test_export_refuses_when_the_epsilon_matters`` shows
the export refusing the default-init case instead of writing a wrong model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from helpers import read_tensors

from evomerge.app.demo.tiny import VOCAB_SIZE, make_finetune, make_tiny_model
from evomerge.engine.merge import merge_to_disk
from evomerge.engine.recipe import Recipe, Route, RouteStep
from evomerge.engine.routing import RoutedLayer, RouteMerger, Router, load_live, route_to_passthrough
from evomerge.errors import EvomergeError

ARCHS = ("llama", "qwen2")
TOL = 1e-4  # exported vs routed logits
MODELS = ("base", "ft1", "ft2")


class Family:
    """A base (initializer_range 0.2, see the module docstring) and two
    stand-in fine-tunes, on disk under ``root`` and live in a ``Router``."""

    def __init__(self, root: Path, arch: str):
        self.arch, self.root = arch, root
        base = make_tiny_model(root / "base", arch=arch, seed=0, initializer_range=0.2)
        make_finetune(base, root / "ft1", seed=1, scale=0.3)
        make_finetune(base, root / "ft2", seed=2, scale=0.3)
        self.live = {name: load_live(root / name) for name in MODELS}
        self.router = Router(self.live)


_FAMILIES: dict[str, Family] = {}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine
    threads waiting for a core make these tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", params=ARCHS)
def fam(request, tmp_path_factory) -> Family:
    if request.param not in _FAMILIES:
        _FAMILIES[request.param] = Family(tmp_path_factory.mktemp(f"route_{request.param}"), request.param)
    return _FAMILIES[request.param]


def route(*steps, embed=None, head=None) -> Route:
    """``route(("base", 0), ("ft1", 2, 1.2), ...)``."""
    return Route(
        layers=[RouteStep(model=s[0], layer=s[1], scale=s[2] if len(s) > 2 else 1.0) for s in steps],
        embed=embed,
        head=head,
    )


def tokens(seed: int, batch: int = 2, length: int = 13) -> torch.Tensor:
    # Above the special tokens: a pad (0) in the prompt would be masked by
    # generate(), and an EOS would end it.
    return torch.randint(4, VOCAB_SIZE, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def max_diff(a, b, seeds=(0, 1, 2)) -> float:
    worst = 0.0
    for seed, length in zip(seeds, (7, 16, 33)):
        ids = tokens(seed, 2, length)
        worst = max(worst, float((logits(a, ids) - logits(b, ids)).abs().max()))
    return worst


@torch.no_grad()
def greedy_without_cache(model, ids: torch.Tensor, steps: int, eos: int | None, pad: int = 0) -> torch.Tensor:
    """Greedy decoding with a full forward pass per token (no KV cache); rows
    that produced EOS continue with padding, as generate() does."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        nxt = logits(model, ids)[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        if eos is not None:
            done |= nxt == eos
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids


def plain_model(router: Router, r: Route):
    """A standard transformers model holding copies of the route's layers
    (scale 1), built from the route's config: what the route must equal."""
    config, tensors = router.folded_state(r)
    cfg = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.load_state_dict(tensors, strict=not router.tied)
    model.tie_weights()
    return model


def recipe(fam: Family, r: Route, **extra) -> Recipe:
    data = {"sources": [{"model": m} for m in MODELS], "dtype": "float32", "route": r.model_dump(), **extra}
    return Recipe.model_validate(data)


def random_route(seed: int, depth: int, depths: dict[str, int]) -> Route:
    """Steps from mixed models, scales in [0.7, 1.4], with at least one layer twice."""
    rng = random.Random(seed)
    names = sorted(depths)
    steps = [[rng.choice(names), 0, round(rng.uniform(0.7, 1.4), 3)] for _ in range(depth)]
    for s in steps:
        s[1] = rng.randrange(depths[s[0]])
    i = rng.randrange(depth - 1)
    j = rng.randrange(i + 1, depth)
    steps[j][:2] = steps[i][:2]  # a repeat (with its own scale)
    return route(*map(tuple, steps))


# -- in memory -------------------------------------------------------------------


def test_identity_route_reproduces_the_source_exactly(fam):
    for name in MODELS:
        host = fam.router.assemble(route(*[(name, i) for i in range(4)]))
        for seed in range(3):
            ids = tokens(seed)
            assert torch.equal(logits(host, ids), logits(fam.live[name], ids)), name
    # Not vacuous: the sources differ, and a different route gives other logits.
    ids = tokens(0)
    assert not torch.equal(logits(fam.live["base"], ids), logits(fam.live["ft1"], ids))
    host = fam.router.assemble(route(("base", 0), ("base", 1), ("base", 3), ("base", 2)))
    assert not torch.allclose(logits(host, ids), logits(fam.live["base"], ids), atol=1e-3)


def test_repeated_layers_equal_a_model_built_with_them_duplicated(fam):
    r = route(("base", 0), ("ft1", 1), ("ft1", 1), ("base", 2), ("ft2", 3), ("base", 2))
    host = fam.router.assemble(r)
    plain = plain_model(fam.router, r)
    assert plain.config.num_hidden_layers == 6
    # The plain model's layers are copies: equal weights, separate storage.
    a, b = plain.model.layers[1].state_dict(), plain.model.layers[2].state_dict()
    assert all(torch.equal(a[k], b[k]) and a[k].data_ptr() != b[k].data_ptr() for k in a)
    assert max_diff(host, plain) <= 1e-5
    # And by hand, for one route: a 3-layer model whose layers 1 and 2 are copies of base's layer 1.
    by_hand_route = route(("base", 0), ("base", 1), ("base", 1), ("base", 3))
    host = fam.router.assemble(by_hand_route)
    cfg = copy.deepcopy(fam.live["base"].config)
    cfg.num_hidden_layers = 4
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in (0, 1, 1, 3)]
    manual = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    src = fam.live["base"].state_dict()
    state = {}
    for k, v in src.items():
        if ".layers." in k:
            i, rest = k.split(".layers.")[1].split(".", 1)
            for out, origin in enumerate((0, 1, 1, 3)):
                if int(i) == origin:
                    state[f"model.layers.{out}.{rest}"] = v.clone()
        else:
            state[k] = v.clone()
    manual.load_state_dict(state, strict=not fam.router.tied)
    manual.tie_weights()
    for seed in range(3):
        ids = tokens(seed)
        assert torch.allclose(logits(host, ids), logits(manual, ids), atol=1e-5, rtol=0)


def test_generate_with_cache_equals_greedy_without(fam):
    r = route(("base", 0), ("ft1", 1, 1.2), ("base", 1), ("base", 1, 0.8), ("ft2", 3), ("ft1", 1))
    host = fam.router.assemble(r)
    eos = host.generation_config.eos_token_id
    for seed in range(4):
        ids = tokens(seed)
        out = host.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + 8
        assert torch.equal(out, greedy_without_cache(host, ids, 8, eos)), f"seed {seed}"


def test_routing_leaves_the_sources_usable_with_a_cache(fam):
    """A routed layer borrows the source's layer and its cache index: after
    routing (layer 0 at two steps), the source alone still generates right."""
    src = fam.live["base"]
    ids = tokens(7, batch=1)
    before = src.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=0)
    host = fam.router.assemble(route(("base", 1), ("base", 0), ("base", 0)))
    host.generate(ids, do_sample=False, max_new_tokens=4, pad_token_id=0)
    assert [layer.self_attn.layer_idx for layer in src.model.layers] == [0, 1, 2, 3]
    after = src.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=0)
    assert torch.equal(before, after)


def _generation_task(root: Path, prompts: list[str]) -> Path:
    tasks = root / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    data = (root / "gen.jsonl").resolve()
    data.write_text("".join(json.dumps({"q": p, "a": "x"}) + "\n" for p in prompts))
    (tasks / "route_gen.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: route_gen
            dataset_path: json
            dataset_kwargs:
              data_files:
                validation: {data}
            validation_split: validation
            output_type: generate_until
            doc_to_text: "{{{{q}}}}"
            doc_to_target: "{{{{a}}}}"
            generation_kwargs:
              until: ["q"]
              max_gen_toks: 6
              do_sample: false
            metric_list:
              - metric: exact_match
                aggregation: mean
                higher_is_better: true
            """
        )
    )
    return tasks


def test_lm_eval_generate_until_on_a_routed_model(fam, tmp_path):
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    prompts = ["12+7=", "The cat", "abc", "hello world", "9*9"]
    tasks = _generation_task(tmp_path, prompts)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    task_dict = manager.load(["route_gen"])
    host = fam.router.assemble(route(("ft1", 0), ("base", 1, 1.1), ("base", 1), ("ft2", 2, 0.9), ("ft1", 3)))
    tok = transformers.AutoTokenizer.from_pretrained(fam.root / "base")
    # batch_size 1: no padding, so each prompt is decoded exactly as alone.
    lm = HFLM(pretrained=host, tokenizer=tok, batch_size=1)
    out = evaluator.evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=0, log_samples=True)
    got = {s["doc"]["q"]: s["resps"][0][0] for s in out["samples"]["route_gen"]}
    assert sorted(got) == sorted(prompts)
    eos = host.generation_config.eos_token_id
    for p in prompts:
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        full = greedy_without_cache(host, ids, 6, eos)[0, ids.shape[1] :].tolist()
        if eos in full:
            full = full[: full.index(eos)]
        expected = tok.decode(full, skip_special_tokens=True).split("q")[0]
        assert got[p] == expected, p
    assert any(got.values()), "every generation is empty: the comparison is vacuous"


# -- export ------------------------------------------------------------------------


def _reload(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()


def test_export_and_reload_matches_the_routed_model(fam, tmp_path):
    depths = dict.fromkeys(MODELS, 4)
    merger = RouteMerger(recipe(fam, route(("base", 0))), root=fam.root)
    routes = [random_route(seed, depth, depths) for seed, depth in enumerate((3, 5, 7, 11))]
    routes.append(route(("ft1", 2, 1.2), ("ft2", 0), ("ft2", 0, 0.8), embed="ft2", head="base"))
    for k, r in enumerate(routes):
        rec = recipe(fam, r)
        host = merger.apply(rec)
        expected = {seed: logits(host, tokens(seed, 2, 9 + seed)) for seed in range(3)}
        out = merger.export(rec, tmp_path / f"routed{k}", progress=False)
        model = _reload(out)
        for seed, want in expected.items():
            diff = float((logits(model, tokens(seed, 2, 9 + seed)) - want).abs().max())
            assert diff <= TOL, f"route {k}: exported logits differ by {diff:.2e}"
        config = json.loads((out / "config.json").read_text())
        assert config["num_hidden_layers"] == len(r.layers)
        if config.get("layer_types") is not None:
            assert len(config["layer_types"]) == len(r.layers)
        written = Recipe.from_dict(yaml.safe_load((out / "recipe.yaml").read_text()))
        assert written.route == r
        for src in written.sources:  # pinned by the sha256 of the weights used
            files = sorted((fam.root / src.model).glob("*.safetensors"))
            assert src.sha256 == {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
        card = (out / "README.md").read_text()
        assert f"| {len(r.layers) - 1} | {r.layers[-1].model} | {r.layers[-1].layer} |" in card
        assert (out / "tokenizer.json").is_file()
    # Not vacuous: the exported models differ from their sources and each other.
    assert max_diff(_reload(tmp_path / "routed0"), fam.live["base"]) > 1e-2
    assert max_diff(_reload(tmp_path / "routed0"), _reload(tmp_path / "routed1")) > 1e-2


def test_passthrough_recipe_matches_the_export(fam, tmp_path):
    depths = dict.fromkeys(MODELS, 4)
    merger = RouteMerger(recipe(fam, route(("base", 0))), root=fam.root)
    for k, r in enumerate([random_route(10 + seed, depth, depths) for seed, depth in enumerate((4, 6, 9))]):
        rec = recipe(fam, r)
        exported = _reload(merger.export(rec, tmp_path / f"export{k}", progress=False))
        passthrough = route_to_passthrough(rec, fam.router.tied)
        assert passthrough.method == "passthrough"
        out = merge_to_disk(passthrough, tmp_path / f"passthrough{k}", root=fam.root, progress=False)
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == len(r.layers)
        diff = max_diff(_reload(out), exported)
        assert diff <= TOL, f"route {k}: passthrough differs from the export by {diff:.2e}"
    # Routes mergekit cannot express have no passthrough form.
    assert route_to_passthrough(recipe(fam, route(("base", 0), ("ft1", 1), embed="ft2")), fam.router.tied) is None


def _run_mergekit(cfg: dict, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    try:
        run_merge(
            MergeConfiguration.model_validate(cfg), str(out), options=MergeOptions(quiet=True, write_model_card=False)
        )
    except Exception as e:
        # mergekit 0.1.5 leaves Qwen2's layer_types at the source depth, which
        # transformers refuses to save once the depth changed: after every
        # tensor is written (see test_parity.py).
        if "layer_types" not in str(e) or not list(out.glob("*.safetensors")):
            raise


def test_mergekit_runs_the_passthrough_recipe_to_the_same_tensors(fam, tmp_path):
    pytest.importorskip("mergekit")
    r = random_route(21, 6, dict.fromkeys(MODELS, 4))
    rec = recipe(fam, r)
    passthrough = route_to_passthrough(rec, fam.router.tied)
    ours = read_tensors(merge_to_disk(passthrough, tmp_path / "ours", root=fam.root, progress=False))
    cfg = yaml.safe_load(passthrough.to_mergekit_yaml())
    # The recipe names the models relative to their folder; mergekit caches
    # loaders by path, so give it absolute ones (both families have a "base").
    for sl in cfg["slices"]:
        for s in sl["sources"]:
            s["model"] = str(fam.root / s["model"])
    _run_mergekit(cfg, tmp_path / "mergekit")
    theirs = read_tensors(tmp_path / "mergekit")
    assert ours.keys() == theirs.keys()
    for name, b in theirs.items():
        err = float((ours[name].double() - b.double()).abs().max())
        assert err <= 1e-5 * float(b.double().abs().max()) + 1e-7, name
    # Scales are folded in: some output projection differs from its source's.
    src = read_tensors(fam.root / r.layers[-1].model)
    last = len(r.layers) - 1
    name = f"model.layers.{last}.mlp.down_proj.weight"
    assert not torch.equal(theirs[name], src[f"model.layers.{r.layers[-1].layer}.mlp.down_proj.weight"])


def test_export_refuses_when_the_epsilon_matters(tmp_path, tmp_path_factory):
    # Default init (initializer_range 0.02): hidden RMS ~0.02, so with scales
    # far from 1 the norms' epsilon moves the logits beyond the tolerance.
    root = tmp_path_factory.mktemp("default_init")
    for arch in ARCHS:
        make_tiny_model(root / arch, arch=arch, seed=0)
        scales = (3.0, 0.3, 3.0, 0.3)
        rec = Recipe.model_validate(
            {
                "sources": [{"model": arch}],
                "route": {"layers": [{"model": arch, "layer": i, "scale": s} for i, s in enumerate(scales)]},
            }
        )
        merger = RouteMerger(rec, root=root)
        parent = tmp_path / arch
        parent.mkdir()
        (parent / "keep.txt").write_text("already here")
        with pytest.raises(EvomergeError, match="do not fold exactly.*epsilon"):
            merger.export(rec, parent / "out", progress=False)
        assert sorted(p.name for p in parent.iterdir()) == ["keep.txt"]
        # The same route at scale 1 exports fine: the refusal is the epsilon's.
        plain = rec.model_copy(update={"route": route(*[(arch, i) for i in range(4)])})
        merger.export(plain, parent / "out", progress=False)
        assert (parent / "out" / "config.json").is_file()


# -- hybrid: merge, then route -------------------------------------------------------


def _hybrid(r: Route) -> Recipe:
    return Recipe.model_validate(
        {
            "method": "ties",
            "base_model": "base",
            "sources": [
                {"model": "ft1", "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": "ft2", "parameters": {"weight": 0.5, "density": 0.7}},
            ],
            "dtype": "float32",
            "route": r.model_dump(),
        }
    )


def test_a_hybrid_split_over_devices_routes_exactly_like_one_device(fam):
    """Every routed source and the merge split by layers ("cpu,cpu": the
    split path without a second device; tests/test_devices.py says more):
    a route that jumps between runs of layers, and repeats one, gives the
    single-device logits bit for bit, cache on or off."""
    r = route(("merge", 3), ("ft2", 0, 1.1), ("merge", 0), ("ft2", 3), ("ft2", 3, 0.9), ("merge", 1))
    rec = _hybrid(r)
    one = RouteMerger(rec, routed=["merge", "ft2"], root=fam.root, device="cpu")
    split = RouteMerger(rec, routed=["merge", "ft2"], root=fam.root, device="cpu,cpu")
    assert split.merger.model.evomerge_layer_plan == [0, 0, 1, 1]
    assert split.router.pool["ft2"].evomerge_layer_plan == [0, 0, 1, 1]
    a, b = one.apply(rec), split.apply(rec)
    for seed in range(2):
        ids = tokens(seed)
        assert torch.equal(logits(a, ids), logits(b, ids))
        with torch.no_grad():
            assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_hybrid_merge_then_route(fam, tmp_path):
    r = route(("merge", 0), ("merge", 1, 1.1), ("ft2", 1, 0.9), ("merge", 2), ("merge", 2, 1.2), ("ft2", 3))
    rec = _hybrid(r)
    merger = RouteMerger(rec, routed=["merge", "ft2"], root=fam.root)
    host = merger.apply(rec)
    expected = {seed: logits(host, tokens(seed)) for seed in range(3)}
    out = merger.export(rec, tmp_path / "hybrid", progress=False)
    model = _reload(out)
    for seed, want in expected.items():
        assert float((logits(model, tokens(seed)) - want).abs().max()) <= TOL
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    assert "ties merge" in (out / "README.md").read_text()
    written = Recipe.from_dict(yaml.safe_load((out / "recipe.yaml").read_text()))
    assert written.route == r and all(src.sha256 for src in written.sources)
    assert route_to_passthrough(rec, fam.router.tied) is None  # mergekit cannot express a hybrid

    # Steps of "merge" are the in-place merge: the identity route over it is
    # merge_to_disk of the recipe's merge part, bit for bit.
    identity = rec.model_copy(update={"route": route(*[("merge", i) for i in range(4)])})
    host = merger.apply(identity)
    merged = _reload(merge_to_disk(rec.merge_part(), tmp_path / "merged", root=fam.root, progress=False))
    for seed in range(3):
        ids = tokens(seed)
        assert torch.equal(logits(host, ids), logits(merged, ids))
    # A recipe with other merge parameters changes what "merge" is.
    other = Recipe.model_validate(
        {
            **identity.model_dump(exclude_none=True),
            "sources": [
                {"model": "ft1", "parameters": {"weight": 0.2, "density": 0.5}},
                {"model": "ft2", "parameters": {"weight": 0.9, "density": 0.7}},
            ],
        }
    )
    host = merger.apply(other)
    assert not torch.allclose(logits(host, tokens(0)), logits(merged, tokens(0)), atol=1e-4)


# -- bad input ---------------------------------------------------------------------


def test_sources_of_different_hidden_size_are_refused(tmp_path):
    a = load_live(make_tiny_model(tmp_path / "h64", arch="llama", hidden=64))
    b = load_live(make_tiny_model(tmp_path / "h32", arch="llama", hidden=32))
    with pytest.raises(EvomergeError, match="different hidden sizes"):
        Router({"a": a, "b": b})


def test_sources_of_different_depth_are_routable(tmp_path):
    shallow = load_live(make_tiny_model(tmp_path / "l2", arch="qwen2", layers=2, initializer_range=0.2))
    deep = load_live(make_tiny_model(tmp_path / "l4", arch="qwen2", layers=4, seed=1, initializer_range=0.2))
    router = Router({"shallow": shallow, "deep": deep})
    assert router.depths == {"shallow": 2, "deep": 4}
    host = router.assemble(route(("shallow", 0), ("shallow", 1)))
    ids = tokens(0)
    assert torch.equal(logits(host, ids), logits(shallow, ids))
    r = route(("deep", 0), ("shallow", 1, 1.2), ("deep", 3), ("shallow", 0), ("deep", 3, 0.9))
    host = router.assemble(r)
    assert host.config.num_hidden_layers == 5 and len(host.config.layer_types) == 5
    assert max_diff(host, plain_model(router, r)) <= TOL
    with pytest.raises(EvomergeError, match="layer 2 of shallow, which has 2 layers"):
        router.assemble(route(("deep", 2), ("shallow", 2)))


def test_bad_routes_are_refused(fam):
    router = fam.router
    with pytest.raises(EvomergeError, match="route is empty"):
        Recipe.model_validate({"sources": [{"model": "base"}], "route": {"layers": []}})
    with pytest.raises(EvomergeError, match="route is empty"):
        router.check(Route(layers=[]))
    deep = Router(fam.live, max_depth=5)
    too_long = route(*[("base", i % 4) for i in range(6)])
    for call in (deep.check, deep.assemble):
        with pytest.raises(EvomergeError, match="6 layers, more than the maximum depth 5"):
            call(too_long)
    deep.assemble(route(*[("base", i % 4) for i in range(5)]))  # at the limit: fine
    with pytest.raises(EvomergeError, match="'nope', which is not a routing source"):
        router.assemble(route(("base", 0), ("nope", 1)))
    with pytest.raises(EvomergeError, match="'nope', which is not among the recipe's sources"):
        Recipe.model_validate({"sources": [{"model": "base"}], "route": {"layers": [{"model": "nope", "layer": 0}]}})
    with pytest.raises(EvomergeError, match="head model 'nope' is not a routing source"):
        router.assemble(route(("base", 0), head="nope"))
    with pytest.raises(EvomergeError, match="layer 4 of ft1, which has 4 layers"):
        router.assemble(route(("base", 0), ("ft1", 4)))
    for scale in (0.0, -1.0):
        with pytest.raises(EvomergeError, match="scales must be positive"):
            router.assemble(route(("base", 0), ("ft1", 1, scale)))
        with pytest.raises(EvomergeError, match="scales must be positive"):
            Recipe.model_validate(
                {"sources": [{"model": "base"}], "route": {"layers": [{"model": "base", "layer": 0, "scale": scale}]}}
            )
    # A refused route leaves the last good one in place.
    good = route(("base", 0), ("ft1", 1))
    host = router.assemble(good)
    with pytest.raises(EvomergeError):
        router.assemble(route(("base", 0), ("ft1", 9)))
    assert router.route == good and len(host.model.layers) == 2


# -- cheap candidates ----------------------------------------------------------------


def test_assembly_shares_weights_and_leaves_sources_alone(fam):
    layers_before = {name: list(m.model.layers) for name, m in fam.live.items()}
    source_ptrs = {p.data_ptr() for m in fam.live.values() for p in m.parameters()}
    n_source_params = sum(p.numel() for m in fam.live.values() for p in m.parameters())
    r = route(("ft2", 3), ("base", 0, 1.3), ("ft1", 1), ("ft1", 1), ("base", 3))
    host = fam.router.assemble(r)
    params = list(host.parameters())
    assert params and all(p.data_ptr() in source_ptrs for p in params)
    assert all(p.device.type == "cpu" for p in host.parameters())  # no meta left from the shell
    for step, routed in zip(r.layers, host.model.layers):
        assert isinstance(routed, RoutedLayer)
        assert routed.layer is fam.live[step.model].model.layers[step.layer]
        assert routed.scale == step.scale
    assert host.model.embed_tokens is fam.live["ft2"].model.embed_tokens
    assert host.model.norm is fam.live["base"].model.norm
    # Nothing added to the sources; their own layer lists are untouched.
    for name, m in fam.live.items():
        assert list(m.model.layers) == layers_before[name]
        assert len(m.model.layers) == 4
    assert sum(p.numel() for m in fam.live.values() for p in m.parameters()) == n_source_params
    # One host object, rebuilt in place for every route.
    assert fam.router.assemble(route(("base", 0))) is host
