"""The engine's public API: plain data in and out, load / unload / models / stats, the policy seam, and the
direction of imports between rooms."""

import ast
import pickle
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

import moeshare
from moeshare.engine import api
from moeshare.engine.api import ModelInfo, Submit
from moeshare.engine.engine import Engine, EngineConfig
from moeshare.engine.request import FinishReason, SamplingParams
from moeshare.errors import MoeshareError

ROOT = Path(moeshare.__file__).parent
PROMPT = "And God said unto Moses,"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def _importers(room: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{p.relative_to(ROOT)} imports {m}"
        for p in sorted((ROOT / room).rglob("*.py"))
        for m in sorted(_imports(p))
        if m.startswith(forbidden)
    ]


def test_the_engine_imports_neither_the_consolidator_nor_the_server_nor_the_cli():
    assert _importers("engine", ("moeshare.consolidate", "moeshare.server", "moeshare.cli")) == []


def test_the_server_reaches_the_engine_only_through_its_api():
    allowed = {"moeshare.engine.api", "moeshare.engine.engine", "moeshare.engine.request"}
    allowed |= {"moeshare.engine.synthetic"}  # --synthetic specs are parsed before anything starts
    used = {
        m for p in (ROOT / "server").rglob("*.py") for m in _imports(p) if m.startswith("moeshare.engine")
    }
    assert used <= allowed, used - allowed


def test_what_crosses_the_api_is_plain_data():
    """Every dataclass of api.py survives a pickle round trip (it could go to another process)."""
    for name in ("Submit", "Usage", "TokenEvent", "ModelInfo", "ModelLoad", "EngineStats"):
        cls = getattr(api, name)
        assert is_dataclass(cls), name
        assert all(not callable(f.default) for f in fields(cls)), name
    event = api.TokenEvent(
        1, "r", "m", 5, "x", -0.5, True, FinishReason.STOP, "", api.Usage(3, 1, 0.0, 1.0, 2.0)
    )
    assert pickle.loads(pickle.dumps(event)) == event


@pytest.fixture(scope="module")
def kjv(tiny_zoo) -> Path:
    return tiny_zoo / "mixtral" / "kjv"


def test_models_describe_each_served_model(kjv):
    engine = Engine([kjv])
    assert engine.models() == [ModelInfo("kjv", str(kjv), "mixtral", "variant", 1024, True, 2048, 64)]
    assert engine.serves("kjv") and not engine.serves("nope")


def test_the_final_event_carries_usage(kjv):
    engine = Engine([kjv])
    handle = engine.submit(
        Submit("kjv", PROMPT, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    )
    events = []
    while engine.has_work():
        events += [ev for ev in engine.step() if ev.seq_id == handle]
    assert [ev.finished for ev in events] == [False, False, False, True]
    assert all(ev.usage is None for ev in events[:-1])
    usage = events[-1].usage
    assert usage.completion_tokens == 4 and usage.prompt_tokens == len(PROMPT.encode())
    assert usage.arrival <= usage.first_token <= usage.finish and usage.tpot is not None


def test_unload_ends_running_requests_with_a_final_cancelled_event_and_frees_their_kv(kjv):
    engine = Engine([kjv])
    handle = engine.submit(Submit("kjv", PROMPT, SamplingParams(max_tokens=50, ignore_eos=True)))
    engine.step()  # queues the prefill
    engine.step()  # reads its token back and queues the next
    assert engine.stats().kv_blocks_used > 0
    assert engine.unload("kjv") == ["kjv"]
    assert engine.models() == [] and engine.stats().kv_blocks_used == 0
    (final,) = engine.step()
    assert final.seq_id == handle and final.finished and final.finish_reason is FinishReason.CANCELLED
    assert final.usage.completion_tokens == 1
    assert not engine.has_work() and engine.cancel(handle) is None


def test_a_checkpoint_is_served_under_the_name_given(kjv, tiny_zoo):
    engine = Engine([])
    assert engine.load(kjv, name="bible") == ["bible"]
    assert engine.generate("bible", PROMPT, SamplingParams(max_tokens=3, temperature=0))[1]
    with pytest.raises(MoeshareError, match="model 'bible' is already served; unload it first"):
        engine.load(tiny_zoo / "mixtral" / "python", name="bible")
    assert [m.name for m in engine.models()] == ["bible"]


def test_an_architecture_without_a_registry_entry_is_one_line_and_loads_nothing():
    from moeshare.engine.synthetic import from_spec

    engine = Engine([])
    source = from_spec("variants=1,hidden=64,intermediate=128,heads=4,kv_heads=2,vocab=300,layers=1", "cpu")
    source.architecture = "gpt_neox"  # an adapter's name the registry has no entry for
    with pytest.raises(
        MoeshareError,
        match=r"serving gpt_neox is not supported yet \(served architectures: llama, mixtral, switch\)",
    ):
        engine.load(source)
    assert engine.models() == [] and engine.stats().kv_blocks_free == 0


class NothingRuns:
    def pick(self, instances):
        return []


class Picks:
    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    def pick(self, instances):
        self.seen.append([m for i in instances for m in i.models])
        return [i for i in instances if i.has_work()]


def test_the_policy_decides_which_instances_run(kjv, tiny_zoo):
    held = Engine([kjv], policy=NothingRuns())
    held.submit(Submit("kjv", PROMPT, SamplingParams(max_tokens=2)))
    assert held.step() == [] and held.stats().waiting == 1
    policy = Picks()
    engine = Engine([kjv, tiny_zoo / "mixtral" / "python"], EngineConfig(), policy)
    engine.submit(Submit("python", "def f(", SamplingParams(max_tokens=2)))
    assert engine.step() == []  # the batch is queued; its events come out of the next step
    assert [ev.model for ev in engine.step()] == ["python"]
    assert policy.seen == [["kjv", "python"]] * 2


def test_a_queued_batch_is_read_back_even_when_the_policy_picks_nothing(kjv):
    policy = Picks()
    engine = Engine([kjv], policy=policy)
    engine.submit(Submit("kjv", PROMPT, SamplingParams(max_tokens=2)))
    assert engine.step() == []
    policy.pick = lambda instances: []
    (ev,) = engine.step()
    assert ev.model == "kjv" and not ev.finished and engine.stats().running == 1
