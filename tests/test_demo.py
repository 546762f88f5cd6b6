import pytest

from skpatchcore import demo


@pytest.fixture
def no_elpv(monkeypatch):
    """Make the ELPV part fail loudly if the demo reaches it."""

    def load_elpv(*args, **kwargs):
        raise AssertionError("the ELPV part ran before --mvtec was checked")

    monkeypatch.setattr(demo, "load_elpv", load_elpv)


def test_a_missing_mvtec_folder_fails_before_the_elpv_part(tmp_path, no_elpv, capsys):
    missing = tmp_path / "nope"
    with pytest.raises(SystemExit) as info:
        demo.main(["--mvtec", str(missing), "--output", str(tmp_path / "out")])
    assert info.value.code == 2
    error = capsys.readouterr().err
    assert "--mvtec" in error and str(missing) in error and "does not exist" in error


def test_a_sub_folder_of_a_category_names_the_category(tmp_path, no_elpv, capsys):
    category = tmp_path / "bottle"
    (category / "train" / "good").mkdir(parents=True)
    (category / "test").mkdir()
    with pytest.raises(SystemExit):
        demo.main(["--mvtec", str(category / "train" / "good")])
    assert "pass the category folder" in capsys.readouterr().err
