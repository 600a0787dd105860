"""Support-set manifests and episode sampling: determinism, disjointness, manifests round-trip."""
import numpy as np
import pytest
from fewshot_digits import single_torch_thread, digits_spec, write_digits_source

from benchmarks.fewshot import data
from benchmarks.fewshot.sampling import Episodes, draw_supports, read_supports, sample_episodes, write_supports


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    spec = digits_spec(write_digits_source(root / "src"))
    ds = data.load_prepared(spec, data.prepare(spec, root / "prep", cache_dir=str(root / "hf"), progress=False))
    return spec, ds, data.class_index(ds)


def test_supports_are_deterministic_keyed_and_within_class(prepared, tmp_path):
    spec, ds, index = prepared
    a = draw_supports(spec, index, "test", shots=[1, 5], trials=3, seed=0)
    b = draw_supports(spec, index, "test", shots=[5, 1], trials=4, seed=0)  # other order, one more trial
    assert len(a) == 3 * 2 * 3
    by_key = {s.key: s.rows for s in b}
    assert all(by_key[s.key] == s.rows for s in a)  # keyed draws: adding work does not move them
    assert draw_supports(spec, index, "test", [5], 3, seed=1)[0].rows != by_key[a[0].class_name, 5, 0]
    names = ds["class_name"]
    assert all(names[r] == s.class_name and len(set(s.rows)) == s.shot for s in a for r in s.rows)
    path = write_supports(a, tmp_path / "supports.csv")
    assert read_supports(path) == a


def test_episodes_are_deterministic_and_queries_never_in_support(prepared, tmp_path):
    spec, ds, index = prepared
    supports = draw_supports(spec, index, "test", [1, 5], trials=3, seed=0)
    ep = sample_episodes(spec, index, supports, "test", ways=3, shot=5, queries=15, n_episodes=40, seed=7)
    again = sample_episodes(spec, index, supports, "test", ways=3, shot=5, queries=15, n_episodes=40, seed=7)
    assert np.array_equal(ep.support, again.support) and np.array_equal(ep.query, again.query)
    other = sample_episodes(spec, index, supports, "test", ways=3, shot=5, queries=15, n_episodes=40, seed=8)
    assert not np.array_equal(ep.query, other.query)
    assert ep.support.shape == (40, 3, 5) and ep.query.shape == (40, 3, 15)
    names = np.asarray(ds["class_name"])
    by_key = {s.key: s.rows for s in supports}
    for e in range(len(ep)):
        assert len(set(ep.classes[e])) == 3 and set(ep.classes[e]) <= set(spec.classes["test"])
        rows = np.concatenate([ep.support[e].ravel(), ep.query[e].ravel()])
        assert len(set(rows.tolist())) == rows.size  # no image twice in an episode
        for i, c in enumerate(ep.classes[e]):
            assert (names[ep.support[e, i]] == c).all() and (names[ep.query[e, i]] == c).all()
            assert tuple(ep.support[e, i]) == by_key[(c, 5, int(ep.trials[e, i]))]
    assert len(set(ep.trials[:, 0].tolist())) == 3  # episodes spread over the trials,
    assert (ep.trials == ep.trials[:, :1]).all()     # each episode within one
    ep.save(tmp_path / "ep.json")
    loaded = Episodes.load(tmp_path / "ep.json")
    assert np.array_equal(loaded.query, ep.query) and loaded.classes == ep.classes


def test_episode_errors_name_the_problem(prepared):
    spec, ds, index = prepared
    supports = draw_supports(spec, index, "test", [5], trials=2, seed=0)
    with pytest.raises(ValueError, match="4-way episodes need 4 classes"):
        sample_episodes(spec, index, supports, "test", ways=4, shot=5, queries=15, n_episodes=1, seed=0)
    with pytest.raises(ValueError, match="class 'seven' \\(test\\) has 24 images; a 5-shot episode with 20 queries"):
        sample_episodes(spec, index, supports, "test", ways=3, shot=5, queries=20, n_episodes=1, seed=0)
    with pytest.raises(ValueError, match="no 1-shot support sets"):
        sample_episodes(spec, index, supports, "test", ways=3, shot=1, queries=15, n_episodes=1, seed=0)
