"""One live model spread over several devices (evomerge.engine.devices).

This machine has no GPU, so a split here is over the CPU named more than
once ("cpu,cpu"): that runs the whole split path (the plan, each layer and
its source tensors placed by the plan, the hooks that move activations, the
merge of each tensor on its parameter's device) but moves nothing between
devices. The placement itself is checked with the meta device, and the
tests at the end split a model over a GPU and the CPU, or over two GPUs,
where there are GPUs."""

import json
import time

import pytest
import torch

from evomerge.app.demo.tiny import make_finetune, make_tiny_model
from evomerge.engine.devices import decoder_layers, parse_devices, plan_layers
from evomerge.engine.inplace import build_model
from evomerge.engine.merge import InPlaceMerger
from evomerge.engine.recipe import Recipe
from evomerge.errors import EvomergeError


@pytest.mark.parametrize(
    "sizes,ends,n",
    [([202] * 32, 262, 2), ([202] * 32, 262, 4), ([10] * 4, 5, 3), ([5, 50, 5, 50, 5, 50], 20, 2), ([10] * 3, 0, 5)],
)
def test_the_plan_cuts_contiguous_runs_of_about_equal_size(sizes, ends, n):
    plan = plan_layers(sizes, ends, n)
    assert len(plan) == len(sizes)
    assert plan == sorted(plan) and 0 <= plan[0] and plan[-1] < n  # contiguous runs, in device order
    used = sorted(set(plan))
    assert len(used) == min(n, len(sizes))  # every device gets layers when there are enough
    load = [ends if d == 0 else 0 for d in range(n)]
    for size, d in zip(sizes, plan):
        load[d] += size
    share = (ends + sum(sizes)) / n
    assert max(load) <= share + max(sizes)  # no device holds more than its share and one layer


def test_a_7b_sized_model_splits_evenly_over_two_and_four_gpus():
    # 32 layers of 202M parameters, embeddings and head 262M: the first GPU also holds the ends.
    two = plan_layers([202] * 32, 262, 2)
    assert (two.count(0), two.count(1)) == (15, 17)
    four = plan_layers([202] * 32, 262, 4)
    assert [four.count(i) for i in range(4)] == [7, 8, 9, 8]


def test_device_settings_parse_or_fail_with_the_fix():
    assert parse_devices("cpu") == [torch.device("cpu")]
    assert parse_devices(" cpu , cpu ") == [torch.device("cpu")] * 2
    assert parse_devices(None) == [torch.device("cuda" if torch.cuda.is_available() else "cpu")]
    with pytest.raises(EvomergeError, match="empty entry.*cuda:0,cuda:1"):
        parse_devices("cpu,")
    with pytest.raises(EvomergeError, match="unknown device 'gpu0'"):
        parse_devices("cpu,gpu0")
    with pytest.raises(EvomergeError, match="unsupported device 'meta'"):
        parse_devices("meta")
    if not torch.cuda.is_available():
        with pytest.raises(EvomergeError, match="no CUDA GPU is available; use cpu"):
            parse_devices("cuda:0,cuda:1")
        with pytest.raises(EvomergeError, match="cuda:all was given but no CUDA GPU"):
            parse_devices("cuda:all")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    out = {}
    for arch in ("llama", "qwen2"):
        base = make_tiny_model(root / arch / "base", arch=arch, layers=4, seed=0)
        out[arch] = (base, [make_finetune(base, root / arch / f"ft{i}", seed=i + 1) for i in range(2)])
    return out


def _recipe(base, ft, method="dare_ties", seed=3):
    return Recipe.from_dict(
        {
            "method": method,
            "base_model": str(base),
            "sources": [
                {"model": str(ft[0]), "parameters": {"weight": [0.9, 0.4], "density": 0.5}},
                {"model": str(ft[1]), "parameters": {"weight": 0.5, "density": [0.3, 0.8]}},
                {"model": str(base)},
            ],
            "dtype": "float32",
            "seed": seed,
        }
    )


def test_placement_puts_each_run_of_layers_on_its_device_and_the_ends_on_the_first(models):
    base, _ = models["qwen2"]
    config = json.loads((base / "config.json").read_text())
    model = build_model(config, torch.float32, [torch.device("cpu"), torch.device("meta")])
    layers = decoder_layers(model)
    assert model.evomerge_layer_plan == [0, 0, 1, 1]
    for layer, d in zip(layers, model.evomerge_layer_plan):
        assert {p.device.type for p in layer.parameters()} == {("cpu", "meta")[d]}
    inside = {id(p) for p in layers.parameters()}
    ends = [p for p in model.parameters() if id(p) not in inside]
    assert ends and all(p.device.type == "cpu" for p in ends)
    # The tied head still shares the embedding's storage after the move.
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_a_layer_on_another_device_gets_its_inputs_moved_there(models):
    """The hook moves positional and keyword tensors (hidden states, the
    rotary tables, the mask) to the layer's device: a layer on the meta
    device takes CPU inputs and computes on meta."""
    base, _ = models["llama"]
    config = json.loads((base / "config.json").read_text())
    model = build_model(config, torch.float32, [torch.device("cpu"), torch.device("meta")])
    last = decoder_layers(model)[-1]
    hidden = torch.randn(1, 5, config["hidden_size"])
    ids = torch.arange(5)[None]
    cos_sin = model.model.rotary_emb(hidden, ids)
    assert hidden.device.type == cos_sin[0].device.type == "cpu"
    out = last(hidden, position_embeddings=cos_sin, attention_mask=None, position_ids=ids)
    out = out[0] if isinstance(out, tuple) else out
    assert out.device.type == "meta" and tuple(out.shape) == (1, 5, config["hidden_size"])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_split_merger_merges_and_runs_exactly_like_one_device(models, arch):
    base, ft = models[arch]
    one = InPlaceMerger(_recipe(base, ft), allow_outside=True, device="cpu")
    split = InPlaceMerger(_recipe(base, ft), allow_outside=True, device="cpu,cpu,cpu")
    assert split.devices == [torch.device("cpu")] * 3
    assert split.model.evomerge_layer_plan[0] == 0 and split.model.evomerge_layer_plan[-1] == 2
    ids = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    for seed, method in [(3, "dare_ties"), (4, "ties"), (5, "dare_ties")]:
        r = _recipe(base, ft, method, seed)
        a, b = one.apply(r), split.apply(r)
        pa = dict(a.named_parameters(remove_duplicate=False))
        for name, p in b.named_parameters(remove_duplicate=False):
            assert torch.equal(p, pa[name]), (method, name)
        with torch.no_grad():
            assert torch.equal(a(ids).logits, b(ids).logits)
    head, embed = split.model.get_output_embeddings().weight, split.model.get_input_embeddings().weight
    assert (head.data_ptr() == embed.data_ptr()) == (arch == "qwen2")  # ties kept, untied heads apart


def test_each_source_tensor_sits_on_the_device_of_the_parameter_it_merges_into(models):
    """A split over the CPU and the meta device: the sources of the layers
    on meta are on meta, those of the first layers and the ends on the CPU."""
    base, ft = models["llama"]
    merger = InPlaceMerger(_recipe(base, ft), allow_outside=True, device=[torch.device("cpu"), torch.device("meta")])
    assert merger.model.evomerge_layer_plan == [0, 0, 1, 1]
    named = dict(merger.model.named_parameters(remove_duplicate=False))
    kinds = set()
    for (_, name), tensor in merger._tensors.items():
        assert tensor.device == named[name].device, name
        kinds.add(tensor.device.type)
    assert kinds == {"cpu", "meta"}


# -- on GPUs (skipped on a machine without them) ---------------------------------------------

GPU_SPLITS = [
    pytest.param("cuda:0,cpu", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
    pytest.param(
        "cuda:0,cuda:1",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"
        ),
    ),
]


@pytest.mark.parametrize("devices", GPU_SPLITS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_model_split_over_real_devices_matches_one_device(models, arch, devices):
    base, ft = models[arch]
    r = _recipe(base, ft, "ties")
    one = InPlaceMerger(r, allow_outside=True, device="cpu").apply(r)
    merger = InPlaceMerger(r, allow_outside=True, device=devices)
    split = merger.apply(r)
    wanted = [torch.device(d) for d in devices.split(",")]
    layers = decoder_layers(split)
    for layer, d in zip(layers, split.evomerge_layer_plan):
        assert {p.device for p in layer.parameters()} == {wanted[d]}
    assert len(set(split.evomerge_layer_plan)) == 2
    # Each source tensor sits on its parameter's device.
    named = dict(split.named_parameters(remove_duplicate=False))
    for (_, name), t in merger._tensors.items():
        if name in named:
            assert t.device == named[name].device, name
    ids = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = one(ids).logits
        got = split(ids.to(wanted[0])).logits
    assert got.device == wanted[0]
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_a_busy_core_is_not_counted_free():
    import os
    import subprocess
    import sys

    from evomerge.engine.devices import free_cores

    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("needs two cores")
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert 1 <= free_cores() <= cores - 1
    finally:
        loop.kill()
        loop.wait()


def test_torch_threads_follow_the_free_cores_and_come_back(monkeypatch):
    import evomerge.engine.devices as devices

    before = torch.get_num_threads()
    said = []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(devices, "free_cores", lambda: 1)
    with devices.free_core_threads(log=said.append) as threads:
        assert threads == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    assert bool(said) == (before > 1)  # the reduction is said, in one line
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))  # the user's choice stands
    with devices.free_core_threads(log=said.append) as threads:
        assert threads == torch.get_num_threads() == before
