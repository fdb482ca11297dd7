"""Every model in ``mlx_lm.models``: served exactly, or refused at load with a reason; the README's
table says which (see ``tests/architectures.py``)."""

from __future__ import annotations

from architectures import load_records, readme_table, render_table, walk

# The architectures issue 15 names: served, token- and logprob-exact (tests/test_architectures.py
# tests them harder: batches, preemption, prefix caching, windows crossed).
MUST_SERVE = ["gemma2", "gemma3_text", "gpt_oss", "qwen3_moe", "mixtral", "phi3", "olmo2"]


def test_every_mlx_lm_architecture_is_served_exactly_or_refused_at_load():
    records = walk()
    wrong = {name: r for name, r in records.items() if r.status not in ("served", "refused", "untested")}
    assert not wrong, f"loaded, then crashed or differed from mlx-lm: {wrong}"
    committed = load_records()
    changed = {name: (committed.get(name), r) for name, r in records.items() if committed.get(name) != r}
    assert not changed, ("tests/architectures.json is out of date (run `uv run python "
                         f"tests/architectures.py`): {changed}")
    assert set(committed) == set(records)


def test_the_readme_table_is_rendered_from_the_records():
    assert readme_table() == render_table(load_records())


def test_the_architectures_the_issue_names_are_served():
    records = load_records()
    assert {name: records[name].status for name in MUST_SERVE} == dict.fromkeys(MUST_SERVE, "served")
