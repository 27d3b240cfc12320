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
    assert tiny.augment.patch_size == cpu.augment.patch_size  # untouched keys keep the base value


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
