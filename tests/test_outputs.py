"""precision.outputs on synthetic trees: what --force may remove for each kind of output directory, and what
makes it remove nothing."""

from __future__ import annotations

import pytest

from precision.errors import PrecisionError
from precision.outputs import LOCK, MARKER, claim_output_dir, remove_owned_contents


def _capture(path):
    with claim_output_dir(path, "capture", complete_marker="manifest.json"):
        (path / "tensors").mkdir()
        (path / "tensors" / "0000.safetensors").write_bytes(b"x")
        (path / "tensors" / ".0001.safetensors.tmp").write_bytes(b"x")
        (path / "manifest.json").write_text("{}")
        (path / "progress.jsonl").write_text("")


def _selftest_tree(root):
    """The layout run_selftest writes: captures/<role>, captures/envelope/<member>, cases/NN/{target,reference}."""
    with claim_output_dir(root, "selftest", complete_marker="selftest.json"):
        for role in ("captures/reference", "captures/truth", "captures/envelope/mlp-fused", "cases/00/target", "cases/01/reference"):
            if role.startswith("cases/"):
                case = root / role.rsplit("/", 1)[0]
                if not case.exists():
                    with claim_output_dir(case, "selftest-case", complete_marker="summary.json"):
                        for name in ("comparison.json", "report.html", "summary.md", "summary.json", ".report.html.tmp"):
                            (case / name).write_text("r")
            _capture(root / role)
        (root / "selftest.json").write_text("{}")


def test_force_removes_a_whole_selftest_tree_and_keeps_the_directory(tmp_path):
    root = tmp_path / "selftest"
    _selftest_tree(root)
    with claim_output_dir(root, "selftest", force=True, complete_marker="selftest.json"):
        assert sorted(p.name for p in root.iterdir()) == [MARKER, LOCK]


def test_one_foreign_file_deep_inside_stops_the_removal_of_everything(tmp_path):
    root = tmp_path / "selftest"
    _selftest_tree(root)
    (root / "cases" / "01" / "reference" / "tensors" / "keep.npy").write_bytes(b"mine")
    before = sorted(str(p) for p in root.rglob("*"))
    with pytest.raises(PrecisionError, match="keep.npy"):
        remove_owned_contents(root)
    assert sorted(str(p) for p in root.rglob("*")) == before


def test_an_unmarked_directory_inside_a_container_is_foreign(tmp_path):
    root = tmp_path / "selftest"
    _selftest_tree(root)
    (root / "cases" / "02").mkdir()
    with pytest.raises(PrecisionError, match="cases/02"):
        claim_output_dir(root, "selftest", force=True, complete_marker="selftest.json")
    assert (root / "selftest.json").exists()


def test_a_directory_with_only_its_marker_is_reclaimed_without_flags(tmp_path):
    path = tmp_path / "c"
    claim_output_dir(path, "capture", complete_marker="manifest.json").close()
    with claim_output_dir(path, "capture", complete_marker="manifest.json") as claimed:
        assert not claimed.resumed


def test_a_symlinked_entry_is_never_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("mine")
    path = tmp_path / "c"
    _capture(path)
    (path / "tensors" / "link").symlink_to(outside)
    with pytest.raises(PrecisionError, match="link"):
        remove_owned_contents(path)
    assert (outside / "precious").read_text() == "mine"
