"""params.yaml: validation, profiles, overrides."""

import copy

import pytest
import yaml

from pipeline.config import PARAMS_FILE, SECTIONS, deep_merge, load_params, read_raw, resolve, set_params
from tests.conftest import REPO
from pipeline.errors import ParamsError


@pytest.fixture
def raw():
    return read_raw(REPO / PARAMS_FILE)


def test_repo_params_valid_for_every_profile(raw):
    for profile in ("cpu", "gpu", "coursework", "tiny"):
        params = resolve({**raw, "profile": profile})
        assert params.profile == profile
        assert set(SECTIONS) <= set(params.model_dump())


def test_profile_overrides_apply(raw):
    cpu = resolve({**raw, "profile": "cpu"})
    tiny = resolve({**raw, "profile": "tiny"})
    expected = raw["augment"]["profiles"]["tiny"]["patches"]
    assert tiny.augment.patches == expected != cpu.augment.patches
    assert tiny.augment.patch_pad == cpu.augment.patch_pad  # untouched keys keep the base value


def test_unknown_key_is_named(raw):
    bad = copy.deepcopy(raw)
    bad["augment"]["patchez"] = 3
    with pytest.raises(ParamsError, match=r"augment\.patchez: unknown key"):
        resolve(bad)


def test_bad_value_is_named(raw):
    bad = copy.deepcopy(raw)
    bad["augment"]["patches"] = "many"
    with pytest.raises(ParamsError, match=r"augment\.patches"):
        resolve(bad)


def test_bad_profile_override_is_named_even_when_inactive(raw):
    bad = copy.deepcopy(raw)
    bad["augment"]["profiles"]["gpu"]["patch_size"] = 7
    with pytest.raises(ParamsError, match=r"augment\.profiles\.gpu\.patch_size"):
        resolve(bad)


def test_unknown_profile_and_section(raw):
    with pytest.raises(ParamsError, match="profile"):
        resolve({**raw, "profile": "laptop"})
    with pytest.raises(ParamsError, match="trainer: unknown key"):
        resolve({**raw, "trainer": {}})


def test_deep_merge_keeps_siblings():
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


def test_set_params_keeps_comments_and_validates(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / PARAMS_FILE).read_text())
    assert set_params(path, "tiny", ["augment.patch_pad=7"]) is True
    text = path.read_text()
    assert "# The single source of truth" in text
    params = load_params(path)
    assert params.profile == "tiny" and params.augment.patch_pad == 7
    assert set_params(path, "tiny", ["augment.patch_pad=7"]) is False  # no-op keeps the file
    before = path.read_text()
    with pytest.raises(ParamsError, match="augment.nope"):
        set_params(path, None, ["augment.nope=1"])
    with pytest.raises(ParamsError, match=r"augment\.profiles\.tiny\.patches: Input should be greater"):
        set_params(path, None, ["augment.patches=-5"])
    assert path.read_text() == before  # nothing written on error


def test_cli_exits_with_message_on_bad_params(tmp_path, capsys, monkeypatch):
    from pipeline.__main__ import main

    raw = yaml.safe_load((REPO / PARAMS_FILE).read_text())
    raw["data"]["retries"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert main(["download"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: params.yaml: data.retries") and "Traceback" not in err


def test_override_of_a_profiled_key_lands_in_the_profile_block(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / PARAMS_FILE).read_text())
    set_params(path, "tiny", ["augment.patches=99", "augment.patch_pad=3"])
    raw = read_raw(path)
    assert raw["augment"]["profiles"]["tiny"]["patches"] == 99  # tiny overrides patches
    assert raw["augment"]["patch_pad"] == 3  # tiny does not override patch_pad: base value
    assert load_params(path).augment.patches == 99


# ---------------------------------------------------------------------------------------------
# issue 9: non-finite numbers, minimal-diff configure, the run-conf allowlist, serialised writers


def _numeric_keys(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _numeric_keys(value, prefix + (key,))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield prefix + (key,)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_every_number_refuses_non_finite_values(raw, bad):
    keys = [k for k in _numeric_keys(raw) if "profiles" not in k]
    assert len(keys) > 40  # every numeric knob of every section, not a sample
    for path in keys:
        tree = copy.deepcopy(raw)
        node = tree
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = bad
        with pytest.raises(ParamsError, match=".".join(path[1:] if path[0] == "" else path)):
            resolve(tree)


def test_set_inf_from_the_command_line_is_refused_and_file_untouched(tmp_path, capsys):
    from pipeline.__main__ import main

    p = tmp_path / "params.yaml"
    p.write_text((REPO / PARAMS_FILE).read_text())
    before = p.read_bytes()
    assert main(["configure", "--params", str(p), "--set", "train_classifier.epochs=.inf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "finite" in err and "train_classifier" in err
    assert p.read_bytes() == before


def _diff(a: str, b: str) -> list[str]:
    import difflib

    return [line for line in difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def test_configure_profile_is_a_one_line_diff(tmp_path):
    p = tmp_path / "params.yaml"
    original = (REPO / PARAMS_FILE).read_text()
    p.write_text(original)
    assert set_params(p, "tiny", [])
    was = read_raw(REPO / PARAMS_FILE)["profile"]
    assert was != "tiny"
    assert _diff(original, p.read_text()) == [f"-profile: {was}", "+profile: tiny"]


def test_configure_changes_only_the_lines_it_sets(tmp_path):
    p = tmp_path / "params.yaml"
    original = (REPO / PARAMS_FILE).read_text()
    p.write_text(original)
    sets = ["train_classifier.batch_size=64",          # a block value with a comment
            "augment.profiles.tiny.patches=300",       # inside a one-line flow mapping
            "train_compressor.encoder_widths=[4, 8, 8, 8]",  # a flow list inside a flow mapping (tiny block)
            "report.title='a, b: c'"]                  # a quoted string that needs quotes
    assert set_params(p, "tiny", sets)
    diff = _diff(original, p.read_text())
    assert len([d for d in diff if d.startswith("-")]) == 5 and len([d for d in diff if d.startswith("+")]) == 5
    new_lines = p.read_text().splitlines()
    old_lines = original.splitlines()
    changed = [i for i, (a, b) in enumerate(zip(old_lines, new_lines)) if a != b]
    for i in changed:  # each comment kept, at its column when the value fits
        if "#" in old_lines[i]:
            assert old_lines[i].split("#", 1)[1] == new_lines[i].split("#", 1)[1]
            assert old_lines[i].index("#") == new_lines[i].index("#")
    params = load_params(p)
    assert params.profile == "tiny" and params.train_classifier.batch_size == 64
    assert params.augment.patches == 300 and list(params.train_compressor.encoder_widths) == [4, 8, 8, 8]
    assert params.report.title == "a, b: c"
    # what was not set is exactly as before (values and text): null stays null
    assert "mirror: null" in p.read_text()
    expected = copy.deepcopy(yaml.safe_load(original))
    expected["profile"] = "tiny"
    expected["train_classifier"]["profiles"]["tiny"]["batch_size"] = 64
    expected["augment"]["profiles"]["tiny"]["patches"] = 300
    expected["train_compressor"]["profiles"]["tiny"]["encoder_widths"] = [4, 8, 8, 8]
    expected["report"]["title"] = "a, b: c"
    assert yaml.safe_load(p.read_text()) == expected


def test_configure_unchanged_value_writes_nothing(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text((REPO / PARAMS_FILE).read_text())
    mtime = p.stat().st_mtime_ns
    assert not set_params(p, None, ["seed=0"])
    assert p.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("key", ["data.mirror=/tmp/evil", "data.cifar_url=http://x/y.tgz",
                                 "data.cifar_md5=0123456789abcdef0123456789abcdef",
                                 "evaluate.rnn_model=runs:/0123/model", "evaluate.profiles.tiny.rnn_model=x.pt",
                                 "tracking.experiment=elsewhere", "tracking.register_models=false"])
def test_run_conf_refuses_data_model_and_tracking_sources(key):
    from pipeline.config import check_run_overrides

    with pytest.raises(ParamsError, match=r"run conf may not set " + key.split("=")[0].replace(".", r"\.")):
        check_run_overrides([key])


def test_run_conf_allows_training_and_evaluation_knobs():
    from pipeline.config import check_run_overrides

    check_run_overrides(["train_classifier.epochs=3", "train_compressor.lr=0.001", "evaluate.images=[1, 2]",
                         "augment.patches=64", "seed=3", "report.claim_grid=32",
                         "train_classifier.profiles.tiny.epochs=1"])


def test_a_second_writer_waits_for_the_first(tmp_path):
    """Two writers of params.yaml at once (two DAG runs, or configure beside a run): the second waits for
    the lock, then applies its change on top of the first's; neither change is lost."""
    import subprocess
    import sys
    import time

    from pipeline.config import params_lock

    p = tmp_path / "params.yaml"
    p.write_text((REPO / PARAMS_FILE).read_text())
    with params_lock(p):
        second = subprocess.Popen([sys.executable, "-m", "pipeline", "configure", "--params", str(p),
                                   "--set", "train_classifier.epochs=5"], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(4)  # ample for the second process to start and reach the lock
        assert second.poll() is None, "the second writer did not wait: " + second.communicate()[1]
        assert load_params(p).train_classifier.epochs != 5
        # the first writer's own change, made while it holds the lock (the reentrant inner part)
        from pipeline.config import _set_params

        _set_params(p, None, ["train_compressor.epochs=7"])
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    params = load_params(p)
    assert params.train_classifier.epochs == 5 and params.train_compressor.epochs == 7
